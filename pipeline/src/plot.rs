//! `distill plot`: training curves (loss and learning rate against step) and
//! benchmark scores against training step, as SVG.

use std::path::Path;

use anyhow::{Context, Result, bail};
use distill_db::stages::{self, StageRow};
use distill_db::{Db, evals, runs, training};
use plotters::prelude::*;

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

/// Draws every score of a run against training step (base and endpoint rows at step 0).
pub async fn scores(db: &Db, run: &str, out: &Path) -> Result<usize> {
    let run = runs::find(db, run).await?;
    let rows = evals::scores_of_run(db.pool(), run.id).await?;
    if rows.is_empty() {
        bail!("run `{}` has no scores yet", run.name);
    }
    // One series per (benchmark, metric, protocol), points ordered by step.
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in &rows {
        let key = format!("{} {} [{}]", r.benchmark, r.metric, &r.protocol_hash[..6]);
        let point = (r.step.unwrap_or(0) as f64, 100.0 * r.value);
        match series.iter_mut().find(|(k, _)| *k == key) {
            Some((_, pts)) => pts.push(point),
            None => series.push((key, vec![point])),
        }
    }
    for (_, pts) in &mut series {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let max_step = rows.iter().filter_map(|r| r.step).max().unwrap_or(0).max(1) as f64;
    let root = SVGBackend::new(out, (960, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{} · scores by training step", run.name),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..max_step, 0f64..100f64)?;
    chart
        .configure_mesh()
        .x_desc("training step (0 = before training)")
        .y_desc("score, %")
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(rows.len())
}
