//! Simulated tasks for demos and tests that need no real teacher (and never stand in
//! for one): task families with problems, reference answers and step-by-step working.

pub mod arithmetic;
