//! Logs (tracing) that do not tear the progress bars.

use std::io::{IsTerminal, Write};

use indicatif::MultiProgress;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Installs the global subscriber: `RUST_LOG` filters (default `info`), output to stderr
/// printed above the progress bars.
pub fn init(bars: MultiProgress) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(BarWriter(bars))
        .try_init();
}

/// Hands each log line to the bars, which hide themselves while it is printed.
#[derive(Clone)]
struct BarWriter(MultiProgress);

impl<'a> MakeWriter<'a> for BarWriter {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            bars: self.0.clone(),
            buf: Vec::new(),
        }
    }
}

/// Buffers one event and writes it in one piece when dropped.
struct LineWriter {
    bars: MultiProgress,
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.bars.suspend(|| {
            let _ = std::io::stderr().write_all(&buf);
        });
    }
}
