//! `distill plot`: training curves (loss and learning rate against step, and a GRPO
//! stage's reward, pass rate and completion length) and benchmark scores against
//! training step, as SVG.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use distill_db::stages::{self, StageRow};
use distill_db::{Db, evals, grpo, runs, training};
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

/// What one stage contributes to the training curves.
#[derive(Debug, Clone, Default)]
struct StageCurves {
    /// The stage's name (the legend).
    name: String,
    /// Its `train_metrics` rows: a train stage's, and a grpo stage's loss and learning rate.
    train: Vec<training::StepMetrics>,
    /// Its `grpo_steps` rows (grpo stages only).
    grpo: Vec<grpo::GrpoStep>,
}

/// Draws the training curves of a run's train and grpo stages (or of the stage named
/// `stage`) into `out`: loss and learning rate, and for grpo stages the reward and pass
/// rate and the mean completion length, against step. Returns the steps drawn.
pub async fn training_curves(db: &Db, run: &str, stage: Option<&str>, out: &Path) -> Result<usize> {
    let run = runs::find(db, run).await?;
    let stages: Vec<StageRow> = stages::list(db.pool(), run.id)
        .await?
        .into_iter()
        .filter(|s| CURVE_KINDS.contains(&s.kind.as_str()) && stage.is_none_or(|n| n == s.name))
        .collect();
    if stages.is_empty() {
        bail!(
            "run `{}` has no train or grpo stage{}",
            run.name,
            stage.map(|s| format!(" named `{s}`")).unwrap_or_default()
        );
    }
    let mut series = Vec::new();
    for s in &stages {
        let curves = StageCurves {
            name: s.name.clone(),
            train: training::steps(db.pool(), s.id).await?,
            grpo: if s.kind == "grpo" {
                grpo::steps(db.pool(), s.id).await?
            } else {
                Vec::new()
            },
        };
        if !curves.train.is_empty() || !curves.grpo.is_empty() {
            series.push(curves);
        }
    }
    if series.is_empty() {
        bail!("no training steps recorded yet in run `{}`", run.name);
    }
    draw_training_curves(&run.name, &series, out)
}

/// Stage kinds with training curves.
const CURVE_KINDS: [&str; 2] = ["train", "grpo"];

/// `lo..hi` widened by 5% of its span on each side away from zero (a range starting at
/// zero keeps its floor), never empty.
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let pad = 0.05 * (hi - lo).max(1e-9);
    let lo = if lo < 0.0 { lo - pad } else { lo };
    lo..hi + pad
}

/// Draws the panels that `series` has data for, one above the other: loss and learning
/// rate (from `train_metrics`), then reward with pass rate and mean completion length
/// (from `grpo_steps`). A stage has the same colour in every panel. Returns the steps drawn.
fn draw_training_curves(run: &str, series: &[StageCurves], out: &Path) -> Result<usize> {
    let has_train = series.iter().any(|s| !s.train.is_empty());
    let has_grpo = series.iter().any(|s| !s.grpo.is_empty());
    let n_points = series.iter().map(|s| s.train.len() + s.grpo.len()).sum();
    let colour = |i: usize| PALETTE[i % PALETTE.len()];
    let max_step = series
        .iter()
        .flat_map(|s| (s.train.iter().map(|m| m.step)).chain(s.grpo.iter().map(|g| g.step)))
        .max()
        .unwrap_or(1)
        .max(1) as f64;

    // The first panel is taller and names the run.
    let panels = 2 * usize::from(has_train) + 2 * usize::from(has_grpo);
    let height = 400 + 320 * (panels as u32 - 1);
    let root = SVGBackend::new(out, (960, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let breaks: Vec<i32> = (1..panels as i32).map(|i| 80 + 320 * i).collect();
    let mut areas = root
        .split_by_breakpoints::<i32, i32, _, _>([], breaks)
        .into_iter();
    let mut first = true;
    let mut caption = |what: &str| {
        if std::mem::take(&mut first) {
            (format!("{run} · {what}"), ("sans-serif", 20))
        } else {
            (what.to_string(), ("sans-serif", 18))
        }
    };

    if has_train {
        let (lo, hi) = series
            .iter()
            .flat_map(|s| s.train.iter().map(|m| m.loss))
            .fold((0f64, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let y_desc = if series.iter().all(|s| s.grpo.is_empty()) {
            "loss per target token"
        } else {
            "loss"
        };
        let area = areas.next().expect("a panel per chart");
        let (text, font) = caption("training loss");
        let mut loss = ChartBuilder::on(&area)
            .caption(text, font)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..max_step, padded(lo, hi))?;
        loss.configure_mesh().x_desc("step").y_desc(y_desc).draw()?;
        for (i, s) in series
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.train.is_empty())
        {
            let c = colour(i);
            loss.draw_series(LineSeries::new(
                s.train.iter().map(|m| (m.step as f64, m.loss)),
                c.stroke_width(2),
            ))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
        }
        loss.configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;

        let lr_max = series
            .iter()
            .flat_map(|s| s.train.iter().map(|m| m.lr))
            .fold(0f64, f64::max)
            * 1.05;
        let area = areas.next().expect("a panel per chart");
        let (text, font) = caption("learning rate");
        let mut lr = ChartBuilder::on(&area)
            .caption(text, font)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..max_step, 0f64..lr_max.max(1e-12))?;
        lr.configure_mesh()
            .x_desc("step")
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            lr.draw_series(LineSeries::new(
                s.train.iter().map(|m| (m.step as f64, m.lr)),
                colour(i).stroke_width(2),
            ))?;
        }
    }

    if has_grpo {
        let (lo, hi) = series
            .iter()
            .flat_map(|s| s.grpo.iter().map(|g| g.reward_mean))
            .fold((0f64, 1f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let area = areas.next().expect("a panel per chart");
        let (text, font) = caption("reward and pass rate");
        let mut reward = ChartBuilder::on(&area)
            .caption(text, font)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..max_step, padded(lo, hi))?;
        reward
            .configure_mesh()
            .x_desc("step")
            .y_desc("mean reward · pass rate")
            .draw()?;
        for (i, s) in series
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.grpo.is_empty())
        {
            let c = colour(i);
            reward
                .draw_series(LineSeries::new(
                    s.grpo.iter().map(|g| (g.step as f64, g.reward_mean)),
                    c.stroke_width(2),
                ))?
                .label(format!("{} reward", s.name))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
            reward
                .draw_series(DashedLineSeries::new(
                    s.grpo.iter().map(|g| (g.step as f64, g.pass_rate)),
                    8,
                    5,
                    c.stroke_width(2),
                ))?
                .label(format!("{} pass rate", s.name))
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (6, 0)], c.stroke_width(2))
                        + PathElement::new(vec![(10, 0), (16, 0)], c.stroke_width(2))
                });
        }
        reward
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;

        let len_max = series
            .iter()
            .flat_map(|s| s.grpo.iter().map(|g| g.completion_tokens))
            .fold(0f64, f64::max);
        let area = areas.next().expect("a panel per chart");
        let (text, font) = caption("mean completion length");
        let mut length = ChartBuilder::on(&area)
            .caption(text, font)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..max_step, padded(0.0, len_max.max(1.0)))?;
        length
            .configure_mesh()
            .x_desc("step")
            .y_desc("tokens")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            length.draw_series(LineSeries::new(
                s.grpo.iter().map(|g| (g.step as f64, g.completion_tokens)),
                colour(i).stroke_width(2),
            ))?;
        }
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

    fn train_row(step: i64, loss: f64, lr: f64) -> training::StepMetrics {
        training::StepMetrics {
            step,
            epoch: step as f64 / 4.0,
            loss,
            lr,
            grad_norm: Some(1.0),
            tokens: 100,
            tokens_per_s: None,
            peak_memory_bytes: None,
        }
    }

    fn grpo_row(step: i64, reward_mean: f64, pass_rate: f64, tokens: f64) -> grpo::GrpoStep {
        grpo::GrpoStep {
            step,
            batch: step - 1,
            reward_mean,
            reward_std: 0.3,
            pass_rate,
            zero_std_groups: 0.25,
            kl: None,
            clip_fraction: 0.01,
            completion_tokens: tokens,
            entropy: 0.8,
            loss: -0.02,
        }
    }

    /// An SFT stage and a GRPO stage after it: the GRPO stage's surrogate loss is negative,
    /// its reward and pass rate rise and its completions shorten.
    fn sft_and_grpo() -> Vec<StageCurves> {
        vec![
            StageCurves {
                name: "sft".into(),
                train: (1..=4)
                    .map(|i| train_row(i, 2.0 / i as f64, 1e-4))
                    .collect(),
                grpo: Vec::new(),
            },
            StageCurves {
                name: "rl".into(),
                train: (1..=4)
                    .map(|i| train_row(i, -0.2 + 0.05 * i as f64, 1e-6))
                    .collect(),
                grpo: (1..=4)
                    .map(|i| {
                        let i = i as f64;
                        grpo_row(i as i64, 0.2 * i, 0.15 * i, 400.0 - 50.0 * i)
                    })
                    .collect(),
            },
        ]
    }

    /// The opening `<svg ...` tag.
    fn root(svg: &str) -> &str {
        let start = svg.find("<svg").unwrap();
        &svg[start..start + svg[start..].find('>').unwrap()]
    }

    /// Polylines of a colour with their points.
    fn lines_of(svg: &str, colour: RGBColor) -> Vec<Vec<(f64, f64)>> {
        let colour = hex(colour);
        tags(svg, "polyline")
            .into_iter()
            .filter(|t| attr(t, "stroke") == Some(colour.as_str()))
            .map(points)
            .collect()
    }

    #[test]
    fn a_grpo_stage_adds_reward_pass_rate_and_completion_length_panels() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("curves.svg");
        assert_eq!(
            draw_training_curves("r", &sft_and_grpo(), &out).unwrap(),
            12
        );
        let svg = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            attr(root(&svg), "height"),
            Some("1360"),
            "four panels: 400 + 3 × 320"
        );

        let texts = texts(&svg);
        for label in [
            "r · training loss",
            "learning rate",
            "reward and pass rate",
            "mean completion length",
            "loss",
            "mean reward · pass rate",
            "tokens",
            "sft",
            "rl",
            "rl reward",
            "rl pass rate",
        ] {
            assert!(texts.contains(&label), "no text {label:?} in {texts:?}");
        }
        assert!(!texts.contains(&"sft reward"), "{texts:?}");

        // Panels: loss above 400 px, learning rate to 720, reward to 1040, length below.
        let panel_at = |y: f64| ((y - 80.0) / 320.0).floor().max(0.0) as usize;
        let panel = |pts: &[(f64, f64)]| -> usize {
            let p = panel_at(pts[0].1);
            assert!(
                pts.iter().all(|q| panel_at(q.1) == p),
                "a line leaves its panel: {pts:?}"
            );
            p
        };
        let rl = lines_of(&svg, PALETTE[1]);
        let whole: Vec<&Vec<(f64, f64)>> = rl.iter().filter(|l| l.len() == 4).collect();
        let panels: Vec<usize> = whole.iter().map(|l| panel(l)).collect();
        assert_eq!(panels, [0, 1, 2, 3], "{rl:?}");
        let (loss, reward, length) = (whole[0], whole[2], whole[3]);
        // The negative loss is drawn inside the chart, above its step labels.
        assert!(loss.iter().all(|p| p.1 < 400.0 - 36.0), "{loss:?}");
        assert!(
            loss.windows(2).all(|w| w[1].1 < w[0].1),
            "loss rises: {loss:?}"
        );
        // Reward rises (up the page), completions shorten (down the page).
        assert!(reward.windows(2).all(|w| w[1].1 < w[0].1), "{reward:?}");
        assert!(length.windows(2).all(|w| w[1].1 > w[0].1), "{length:?}");
        // Completion length from 350 to 200 tokens on a 0..~367 axis: the last point is
        // a bit over half as high as the first above the axis.
        let base = 400.0 + 3.0 * 320.0 - 12.0 - 36.0;
        let ratio = (base - length[3].1) / (base - length[0].1);
        assert!((ratio - 200.0 / 350.0).abs() < 0.02, "{ratio} {length:?}");

        // Pass rate: dashes in the reward panel, each below the reward line at its steps.
        let dashes: Vec<&Vec<(f64, f64)>> =
            rl.iter().filter(|l| l.len() < 4 && panel(l) == 2).collect();
        assert!(dashes.len() >= 4, "no dashed pass rate: {rl:?}");
        let reward_y = |x: f64| {
            let w = reward
                .windows(2)
                .find(|w| w[0].0 <= x && x <= w[1].0)
                .unwrap();
            w[0].1 + (w[1].1 - w[0].1) * (x - w[0].0) / (w[1].0 - w[0].0)
        };
        for p in dashes.iter().flat_map(|d| d.iter()) {
            if p.0 >= reward[0].0 && p.0 <= reward[3].0 {
                assert!(p.1 > reward_y(p.0), "pass rate above reward at {p:?}");
            }
        }

        // The SFT stage has only the loss and learning-rate panels.
        let sft: Vec<usize> = lines_of(&svg, PALETTE[0])
            .iter()
            .filter(|l| l.len() == 4)
            .map(|l| panel(l))
            .collect();
        assert_eq!(sft, [0, 1]);
    }

    #[test]
    fn train_stages_alone_keep_the_two_panels() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("curves.svg");
        let sft = sft_and_grpo().swap_remove(0);
        assert_eq!(draw_training_curves("r", &[sft], &out).unwrap(), 4);
        let svg = std::fs::read_to_string(&out).unwrap();
        let texts = texts(&svg);
        assert!(texts.contains(&"loss per target token"), "{texts:?}");
        assert!(
            !texts
                .iter()
                .any(|t| t.contains("reward") || t.contains("completion")),
            "{texts:?}"
        );
        assert_eq!(attr(root(&svg), "height"), Some("720"));
    }

    #[tokio::test]
    async fn plot_picks_train_and_grpo_stages_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let pool = db.pool();
        sqlx::query(
            "INSERT INTO runs (id, name, config_path, config, workdir, status, created_at, updated_at)
             VALUES (1, 'q', 'q.toml', '', '.', 'done', 0, 0)",
        )
        .execute(pool)
        .await
        .unwrap();
        for (id, name, kind) in [
            (1, "sft", "train"),
            (2, "rl", "grpo"),
            (3, "gen", "generate"),
        ] {
            sqlx::query(
                "INSERT INTO stages (id, run_id, name, kind, position, needs, params, fingerprint, status)
                 VALUES (?, 1, ?, ?, ?, '[]', '{}', 'f', 'done')",
            )
            .bind(id)
            .bind(name)
            .bind(kind)
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
        }
        for (stage, curves) in [1, 2].into_iter().zip(sft_and_grpo()) {
            let mut tx = db.write().await.unwrap();
            for m in &curves.train {
                training::record_step(&mut tx, stage, m).await.unwrap();
            }
            for g in &curves.grpo {
                grpo::record_step(&mut tx, stage, g).await.unwrap();
            }
            tx.commit().await.unwrap();
        }
        let out = dir.path().join("curves.svg");

        assert_eq!(
            training_curves(&db, "q", Some("rl"), &out).await.unwrap(),
            8
        );
        let svg = std::fs::read_to_string(&out).unwrap();
        let labels = texts(&svg);
        assert!(labels.contains(&"rl pass rate"), "{labels:?}");
        assert!(!labels.contains(&"sft"), "{labels:?}");

        assert_eq!(training_curves(&db, "q", None, &out).await.unwrap(), 12);
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(texts(&svg).contains(&"sft"));

        assert_eq!(
            training_curves(&db, "q", Some("sft"), &out).await.unwrap(),
            4
        );
        let err = training_curves(&db, "q", Some("gen"), &out)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "run `q` has no train or grpo stage named `gen`"
        );
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
