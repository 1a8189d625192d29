//! The fake's wire format, checked over raw HTTP/1.1 so no client library's
//! tolerance hides a mistake.

use std::time::Duration;

use distill_fake_teacher::{FakeConfig, FakeTeacher, Fault, ReasoningFormat, When};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Reply {
    status: u16,
    head: String,
    body: String,
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap().trim(), 16)
            .unwrap();
        raw = &raw[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

async fn http(
    server: &FakeTeacher,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &str,
) -> Reply {
    let mut s = TcpStream::connect(server.addr()).await.unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let rest = &raw[split + 4..];
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    let status = head[9..12].parse().unwrap();
    Reply {
        status,
        head,
        body: String::from_utf8(body).unwrap(),
    }
}

fn chat_body(stream: bool, n: u32) -> String {
    format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"stream":{stream},"n":{n},"stream_options":{{"include_usage":true}}}}"#
    )
}

#[tokio::test]
async fn models_stats_and_unknown_routes() {
    let server = FakeTeacher::start(FakeConfig::default().model("r1-fake"))
        .await
        .unwrap();
    let r = http(&server, "GET", "/v1/models", None, "").await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["data"][0]["id"], "r1-fake");
    assert_eq!(http(&server, "GET", "/nope", None, "").await.status, 404);
    http(
        &server,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body(false, 1)),
        "",
    )
    .await;
    let r = http(&server, "GET", "/stats", None, "").await;
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        (
            v["requests"].as_u64(),
            v["completions"].as_u64(),
            v["model_requests"].as_u64()
        ),
        (Some(1), Some(1), Some(1))
    );
}

#[tokio::test]
async fn stream_interleaves_choices_then_finishes_usage_and_done() {
    let server = FakeTeacher::start(
        FakeConfig::default()
            .format(ReasoningFormat::InlineThink)
            .chunks(3),
    )
    .await
    .unwrap();
    let r = http(
        &server,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body(true, 2)),
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("content-type: text/event-stream")
    );
    let events: Vec<&str> = r.body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let json: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    // 3 content events per choice, alternating 0,1,0,1,0,1, then two finishes and usage.
    let indices: Vec<u64> = json[..6]
        .iter()
        .map(|j| j["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, vec![0, 1, 0, 1, 0, 1]);
    let content: String = json[..6]
        .iter()
        .filter(|j| j["choices"][0]["index"] == 1)
        .map(|j| j["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        content,
        "<think>\nstep 1 for hi\nstep 2 for hi\nsample 1\n</think>\n\n\\boxed{2}"
    );
    assert_eq!(json[6]["choices"][0]["finish_reason"], "stop");
    assert_eq!(json[7]["choices"][0]["finish_reason"], "stop");
    assert_eq!(json[8]["choices"], serde_json::json!([]));
    assert!(json[8]["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(server.stats().completions, 2);
}

#[tokio::test]
async fn keep_alive_fault_adds_comments_and_blank_lines() {
    let server = FakeTeacher::start(FakeConfig::default().fault(When::Always, Fault::KeepAlive))
        .await
        .unwrap();
    let r = http(
        &server,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body(true, 1)),
        "",
    )
    .await;
    assert!(r.body.starts_with(": keep-alive\n\n\n"));
    assert!(r.body.matches(": keep-alive").count() > 2);
    let r = http(
        &server,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body(false, 1)),
        "",
    )
    .await;
    assert!(r.body.starts_with("\n\n\n{"));
    assert_eq!(server.stats().faults["keep_alive"], 2);
}

#[tokio::test]
async fn error_faults_and_auth() {
    let server = FakeTeacher::start(
        FakeConfig::default()
            .api_key("k1")
            .fault(
                When::Request(2),
                Fault::RateLimited {
                    retry_after: Some(Duration::from_millis(1500)),
                },
            )
            .fault(When::Request(3), Fault::insufficient_balance()),
    )
    .await
    .unwrap();
    let body = chat_body(false, 1);
    let r = http(
        &server,
        "POST",
        "/v1/chat/completions",
        Some(&body),
        "Authorization: Bearer wrong\r\n",
    )
    .await;
    assert_eq!(r.status, 401);
    let auth = "Authorization: Bearer k1\r\n";
    let r = http(&server, "POST", "/v1/chat/completions", Some(&body), auth).await;
    assert_eq!(r.status, 429);
    assert!(
        r.head.to_ascii_lowercase().contains("retry-after: 1.5"),
        "{}",
        r.head
    );
    let r = http(&server, "POST", "/v1/chat/completions", Some(&body), auth).await;
    assert_eq!(r.status, 402);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["error"]["message"], "Insufficient Balance");
    let r = http(
        &server,
        "POST",
        "/v1/chat/completions",
        Some("{not json"),
        auth,
    )
    .await;
    assert_eq!(r.status, 400);
    let s = server.stats();
    assert_eq!(
        (s.requests, s.unauthorized, s.rejected, s.completions),
        (4, 1, 1, 0)
    );
}

#[tokio::test]
async fn shutdown_closes_the_port() {
    let server = FakeTeacher::start(FakeConfig::default()).await.unwrap();
    let addr = server.addr();
    server.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err());
}
