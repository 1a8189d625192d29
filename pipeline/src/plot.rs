//! `distill plot`: training curves (loss and learning rate against step) and
//! benchmark scores against training step, as SVG.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use distill_db::stages::{self, StageRow};
use distill_db::{Db, evals, runs, training};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Colours for successive series.
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws the loss and learning-rate curves of a run's train stages into `out`.
pub async fn training_curves(db: &Db, run: &str, stage: Option<&str>, out: &Path) -> Result<usize> {
    let run = runs::find(db, run).await?;
    let trains: Vec<StageRow> = stages::list(db.pool(), run.id)
        .await?
        .into_iter()
        .filter(|s| s.kind == "train" && stage.is_none_or(|n| n == s.name))
        .collect();
    if trains.is_empty() {
        bail!(
            "run `{}` has no train stage{}",
            run.name,
            stage.map(|s| format!(" named `{s}`")).unwrap_or_default()
        );
    }
    let mut series = Vec::new();
    for s in &trains {
        let steps = training::steps(db.pool(), s.id).await?;
        if !steps.is_empty() {
            series.push((s.name.clone(), steps));
        }
    }
    if series.is_empty() {
        bail!("no training steps recorded yet in run `{}`", run.name);
    }
    let n_points = series.iter().map(|(_, s)| s.len()).sum();
    let root = SVGBackend::new(out, (960, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(400);
    let max_step = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|m| m.step))
        .max()
        .unwrap_or(1) as f64;
    let loss_max = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|m| m.loss))
        .fold(0f64, f64::max)
        * 1.05;
    let lr_max = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|m| m.lr))
        .fold(0f64, f64::max)
        * 1.05;

    let mut loss = ChartBuilder::on(&top)
        .caption(format!("{} · training loss", run.name), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..max_step.max(1.0), 0f64..loss_max.max(1e-9))?;
    loss.configure_mesh()
        .x_desc("step")
        .y_desc("loss per target token")
        .draw()?;
    for (i, (name, steps)) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        loss.draw_series(LineSeries::new(
            steps.iter().map(|m| (m.step as f64, m.loss)),
            c.stroke_width(2),
        ))?
        .label(name.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
    }
    loss.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;

    let mut lr = ChartBuilder::on(&bottom)
        .caption("learning rate", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..max_step.max(1.0), 0f64..lr_max.max(1e-12))?;
    lr.configure_mesh()
        .x_desc("step")
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .draw()?;
    for (i, (_, steps)) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        lr.draw_series(LineSeries::new(
            steps.iter().map(|m| (m.step as f64, m.lr)),
            c.stroke_width(2),
        ))?;
    }
    root.present()
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(n_points)
}

/// One line of the scores chart.
#[derive(Debug, Clone, PartialEq)]
struct ScoreSeries {
    /// Legend text.
    name: String,
    /// A trained model's scores by step, or a reference without a step.
    line: Line,
}

#[derive(Debug, Clone, PartialEq)]
enum Line {
    /// (step, score %) of a train stage's checkpoints (and its base at step 0), by step.
    Trained(Vec<(f64, f64)>),
    /// The score % of a model that was not trained here (a teacher, a model folder).
    Reference(f64),
}

/// The model a score belongs to: a train stage's name for its checkpoints and its base
/// (so they form one series), the label for anything else.
fn model_of(r: &evals::ScoreRow) -> String {
    let trained = r
        .target
        .strip_prefix("checkpoint:")
        .and_then(|t| t.rsplit_once('@').map(|(name, _)| name))
        .or_else(|| r.target.strip_prefix("base:"));
    match (trained, r.step) {
        (Some(name), Some(_)) => name.to_string(),
        _ => r.label.clone(),
    }
}

/// Splits score rows into one series per (model, benchmark, metric, protocol): trained
/// models by step first, then references. The benchmark and metric are named in the
/// legend only when the chart holds more than one of them.
fn score_series(rows: &[evals::ScoreRow]) -> Vec<ScoreSeries> {
    let mut measures: Vec<(&str, &str, &str)> = Vec::new();
    for r in rows {
        let m = (
            r.benchmark.as_str(),
            r.metric.as_str(),
            r.protocol_hash.as_str(),
        );
        if !measures.contains(&m) {
            measures.push(m);
        }
    }
    let measure_name = |r: &evals::ScoreRow| -> String {
        if measures.len() == 1 {
            return String::new();
        }
        let protocols = measures
            .iter()
            .filter(|(b, m, _)| *b == r.benchmark && *m == r.metric)
            .count();
        let mut name = format!(" · {} {}", r.benchmark, r.metric);
        if protocols > 1 {
            let _ = write!(
                name,
                " [{}]",
                &r.protocol_hash[..6.min(r.protocol_hash.len())]
            );
        }
        name
    };
    let mut trained: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut references: Vec<ScoreSeries> = Vec::new();
    for r in rows {
        let name = format!("{}{}", model_of(r), measure_name(r));
        let value = 100.0 * r.value;
        match r.step {
            Some(step) => match trained.iter_mut().find(|(n, _)| *n == name) {
                Some((_, pts)) => pts.push((step as f64, value)),
                None => trained.push((name, vec![(step as f64, value)])),
            },
            None => references.push(ScoreSeries {
                name,
                line: Line::Reference(value),
            }),
        }
    }
    trained
        .into_iter()
        .map(|(name, mut pts)| {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            ScoreSeries {
                name,
                line: Line::Trained(pts),
            }
        })
        .chain(references)
        .collect()
}

/// Draws every score of a run: each trained model as a line over its checkpoints' steps
/// (its base at step 0), and each model without a step (teacher, model folder) as a
/// labelled dashed horizontal line, so references never join a training curve.
pub async fn scores(db: &Db, run: &str, out: &Path) -> Result<usize> {
    let run = runs::find(db, run).await?;
    let rows = evals::scores_of_run(db.pool(), run.id).await?;
    if rows.is_empty() {
        bail!("run `{}` has no scores yet", run.name);
    }
    let series = score_series(&rows);
    let mut caption = format!("{} · scores by training step", run.name);
    let first = &rows[0];
    if rows
        .iter()
        .all(|r| r.benchmark == first.benchmark && r.metric == first.metric)
    {
        let _ = write!(caption, " · {} {}", first.benchmark, first.metric);
    }
    let max_step = rows.iter().filter_map(|r| r.step).max().unwrap_or(0).max(1) as f64;
    let root = SVGBackend::new(out, (960, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..max_step, 0f64..100f64)?;
    chart
        .configure_mesh()
        .x_desc("training step (0 = before training)")
        .y_desc("score, %")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        match &s.line {
            Line::Trained(pts) => {
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
                    .label(s.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                    });
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
            }
            Line::Reference(value) => {
                chart
                    .draw_series(DashedLineSeries::new(
                        [(0.0, *value), (max_step, *value)],
                        8,
                        5,
                        c.stroke_width(2),
                    ))?
                    .label(format!("{} (no training step)", s.name))
                    .legend(move |(x, y)| {
                        EmptyElement::at((x, y))
                            + PathElement::new(vec![(0, 0), (6, 0)], c.stroke_width(2))
                            + PathElement::new(vec![(10, 0), (16, 0)], c.stroke_width(2))
                    });
                // Named on the line itself too, above it unless that leaves the chart.
                let (dy, anchor) = if *value > 92.0 {
                    (6, VPos::Top)
                } else {
                    (-6, VPos::Bottom)
                };
                chart.draw_series(std::iter::once(
                    EmptyElement::at((0.0, *value))
                        + Text::new(
                            format!("{} {value:.1}%", s.name),
                            (8, dy),
                            ("sans-serif", 14)
                                .into_font()
                                .color(&c)
                                .pos(Pos::new(HPos::Left, anchor)),
                        ),
                ))?;
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attribute `name` of an SVG tag.
    fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
        let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        Some(&tag[start..start + tag[start..].find('"')?])
    }

    /// Every `<kind .../>` tag of an SVG.
    fn tags<'a>(svg: &'a str, kind: &str) -> Vec<&'a str> {
        svg.match_indices(&format!("<{kind} "))
            .map(|(i, _)| &svg[i..i + svg[i..].find("/>").unwrap()])
            .collect()
    }

    /// The text of every `<text>` element, trimmed.
    fn texts(svg: &str) -> Vec<&str> {
        svg.split("<text ")
            .skip(1)
            .filter_map(|t| Some(t[t.find('>')? + 1..t.find("</text>")?].trim()))
            .collect()
    }

    fn points(polyline: &str) -> Vec<(f64, f64)> {
        attr(polyline, "points")
            .unwrap()
            .split_whitespace()
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect()
    }

    fn hex(c: RGBColor) -> String {
        format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
    }

    /// The quickstart's shape: a student's base and checkpoints in one evaluate stage,
    /// the simulated teacher (no step) in another.
    async fn quickstart_scores(db: &Db) {
        let pool = db.pool();
        sqlx::query(
            "INSERT INTO runs (id, name, config_path, config, workdir, status, created_at, updated_at)
             VALUES (1, 'q', 'q.toml', '', '.', 'done', 0, 0)",
        )
        .execute(pool)
        .await
        .unwrap();
        for (id, name) in [(1, "eval-student"), (2, "eval-teacher")] {
            sqlx::query(
                "INSERT INTO stages (id, run_id, name, kind, position, needs, params, fingerprint, status)
                 VALUES (?, 1, ?, 'evaluate', ?, '[]', '{}', 'f', 'done')",
            )
            .bind(id)
            .bind(name)
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
        }
        let rows: [(i64, &str, &str, Option<i64>, f64); 4] = [
            (1, "base:student", "student@0", Some(0), 0.0),
            (1, "checkpoint:student@600", "student@600", Some(600), 0.55),
            (
                1,
                "checkpoint:student@1185",
                "student@1185",
                Some(1185),
                0.83,
            ),
            (2, "teacher:sim", "simulated teacher", None, 0.90),
        ];
        for (stage, target, label, step, value) in rows {
            sqlx::query(
                "INSERT INTO scores (stage_id, target, label, step, benchmark, metric, value, stderr,
                     questions, protocol, protocol_hash, created_at)
                 VALUES (?, ?, ?, ?, 'arithmetic-test', 'pass@1', ?, 0.03, 100, '{}', 'abcdef0123', 0)",
            )
            .bind(stage)
            .bind(target)
            .bind(label)
            .bind(step)
            .bind(value)
            .execute(pool)
            .await
            .unwrap();
        }
    }

    #[tokio::test]
    async fn a_teacher_is_a_labelled_horizontal_line_not_a_point_of_the_student() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        quickstart_scores(&db).await;
        let out = dir.path().join("scores.svg");
        assert_eq!(scores(&db, "q", &out).await.unwrap(), 4);
        let svg = std::fs::read_to_string(&out).unwrap();
        let (student, teacher) = (hex(PALETTE[0]), hex(PALETTE[1]));
        let lines = |colour: &str| -> Vec<Vec<(f64, f64)>> {
            tags(&svg, "polyline")
                .into_iter()
                .filter(|t| attr(t, "stroke") == Some(colour))
                .map(points)
                .collect()
        };

        // The student's line: its base and two checkpoints, by step, rising.
        let curve = lines(&student)
            .into_iter()
            .max_by_key(Vec::len)
            .expect("a student line");
        assert_eq!(
            curve.len(),
            3,
            "the student's line has a foreign point: {curve:?}"
        );
        assert!(
            curve.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 < w[0].1),
            "{curve:?}"
        );
        // Pixels per score point, from the student's 0% and 83%.
        let y_of = |pct: f64| curve[0].1 + (curve[2].1 - curve[0].1) * pct / 83.0;

        // The teacher: only horizontal strokes at 90%, spanning the steps, no markers.
        let strokes = lines(&teacher);
        assert!(!strokes.is_empty(), "no teacher line");
        let on_chart: Vec<(f64, f64)> = strokes
            .iter()
            .flatten()
            .copied()
            .filter(|p| (p.1 - y_of(90.0)).abs() <= 1.5)
            .collect();
        let xs = on_chart.iter().map(|p| p.0);
        let (lo, hi) = (
            xs.clone().fold(f64::MAX, f64::min),
            xs.fold(f64::MIN, f64::max),
        );
        assert!(
            lo <= curve[0].0 + 1.0 && hi >= curve[2].0 - 1.0,
            "{strokes:?}"
        );
        for s in &strokes {
            assert!(
                s.iter().all(|p| p.1 == s[0].1),
                "a teacher stroke is not horizontal: {s:?}"
            );
        }
        assert!(
            tags(&svg, "circle")
                .iter()
                .all(|c| attr(c, "fill") != Some(teacher.as_str())),
            "the teacher has a point"
        );

        // A legend naming both, and the line's own label.
        let texts = texts(&svg);
        for label in [
            "student",
            "simulated teacher (no training step)",
            "simulated teacher 90.0%",
        ] {
            assert!(texts.contains(&label), "no text {label:?} in {texts:?}");
        }
    }

    #[test]
    fn series_split_by_model_and_name_the_measure_only_when_there_are_several() {
        let row = |target: &str, label: &str, step: Option<i64>, metric: &str| evals::ScoreRow {
            stage: "e".into(),
            target: target.into(),
            label: label.into(),
            step,
            benchmark: "b".into(),
            metric: metric.into(),
            value: 0.5,
            stderr: 0.0,
            questions: 1,
            protocol: "{}".into(),
            protocol_hash: "0123456789".into(),
            truncated: None,
            mean_tokens: None,
        };
        let one = score_series(&[
            row("checkpoint:sft@20", "sft@20", Some(20), "pass@1"),
            row("model:/m/Qwen", "Qwen", None, "pass@1"),
            row("base:sft", "sft@0", Some(0), "pass@1"),
        ]);
        assert_eq!(
            one,
            [
                ScoreSeries {
                    name: "sft".into(),
                    line: Line::Trained(vec![(0.0, 50.0), (20.0, 50.0)])
                },
                ScoreSeries {
                    name: "Qwen".into(),
                    line: Line::Reference(50.0)
                },
            ]
        );
        let two = score_series(&[
            row("checkpoint:sft@20", "sft@20", Some(20), "pass@1"),
            row("checkpoint:sft@20", "sft@20", Some(20), "pass@4"),
        ]);
        let names: Vec<&str> = two.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["sft · b pass@1", "sft · b pass@4"]);
    }
}
