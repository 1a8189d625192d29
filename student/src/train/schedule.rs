//! Learning rate as a pure function of the step, so a resumed run needs no scheduler state
//! beyond the step counter. Formulas are transformers' (`get_*_schedule_with_warmup`,
//! `cosine_with_min_lr`), step `s` counted from 0 for the first update: with warmup the first
//! update has learning rate 0, as in transformers.

use super::config::{LrSchedule, TrainConfig};

/// Warmup length in optimizer steps for a run of `total_steps`.
pub fn warmup_steps(config: &TrainConfig, total_steps: usize) -> usize {
    config
        .warmup_steps
        .unwrap_or_else(|| (config.warmup_ratio * total_steps as f64).ceil() as usize)
}

/// Learning rate of optimizer step `step` (0-based) in a run of `total_steps`.
pub fn learning_rate(config: &TrainConfig, step: usize, total_steps: usize) -> f64 {
    let peak = config.learning_rate;
    let warmup = warmup_steps(config, total_steps);
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let span = total_steps.saturating_sub(warmup).max(1) as f64;
    let m = config.min_lr_ratio;
    let factor = match config.schedule {
        LrSchedule::Constant => return peak,
        LrSchedule::Linear => (total_steps.saturating_sub(step) as f64 / span).clamp(0.0, 1.0),
        LrSchedule::Cosine => {
            let progress = ((step - warmup) as f64 / span).min(1.0);
            0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    };
    peak * (m + (1.0 - m) * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(schedule: LrSchedule) -> TrainConfig {
        TrainConfig {
            learning_rate: 1.0,
            schedule,
            warmup_ratio: 0.1,
            min_lr_ratio: 0.1,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn warmup_rounds_up_and_starts_at_zero() {
        let c = cfg(LrSchedule::Cosine);
        assert_eq!(warmup_steps(&c, 95), 10);
        assert_eq!(learning_rate(&c, 0, 95), 0.0);
        assert_eq!(learning_rate(&c, 5, 95), 0.5);
        assert_eq!(learning_rate(&c, 10, 95), 1.0);
    }

    #[test]
    fn cosine_and_linear_reach_min_ratio() {
        let c = cfg(LrSchedule::Cosine);
        // Halfway through the decay: factor 0.5, scaled into [0.1, 1].
        assert!((learning_rate(&c, 10 + 45, 100) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&c, 100, 100) - 0.1).abs() < 1e-12);
        let l = cfg(LrSchedule::Linear);
        assert!((learning_rate(&l, 55, 100) - (0.1 + 0.9 * 0.5)).abs() < 1e-12);
        let k = cfg(LrSchedule::Constant);
        assert_eq!(learning_rate(&k, 99, 100), 1.0);
    }
}
