//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use distill_fake_teacher::{FakeConfig, FakeTeacher};
use distill_teacher::{BaseUrls, OpenAiClient, TeacherConfig};

/// A config with small timeouts and near-zero backoff so faults resolve in
/// milliseconds.
pub fn fast_config(urls: impl Into<BaseUrls>) -> TeacherConfig {
    let mut c = TeacherConfig::new(urls, "fake-r1");
    c.connect_timeout_s = 1.0;
    c.request_timeout_s = 10.0;
    c.retry_base_delay_s = 0.005;
    c.retry_max_delay_s = 0.02;
    c.max_retries = 3;
    c.rest_s = 60.0;
    c
}

pub async fn fake(config: FakeConfig) -> FakeTeacher {
    FakeTeacher::start(config)
        .await
        .expect("fake teacher starts")
}

pub fn client(config: TeacherConfig) -> OpenAiClient {
    OpenAiClient::with_api_key(config, None).expect("client builds")
}

/// A base URL whose port refuses connections.
pub fn closed_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}/v1")
}

/// A log sink for a test's tracing subscriber (`with_writer(move || sink.clone())`).
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
