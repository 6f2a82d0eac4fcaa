//! The server under load and abuse: a full queue, clients that leave, kill -9 against the
//! audit database, abusive clients beside well-behaved ones, rate limits and connection
//! caps.

use super::*;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A streaming request on a raw socket, read up to its first SSE event.
fn open_stream(base: &str, body: &str) -> TcpStream {
    let addr = base.strip_prefix("http://").unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    write!(sock, "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = sock.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    sock
}

#[test]
fn a_full_queue_answers_429_and_a_client_that_leaves_frees_its_slot() {
    let Some((model, _machine)) = trained_model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("audit.sqlite");
    let s = Server::start(
        &model,
        &[
            "--parallel",
            "1",
            "--queue",
            "0",
            "--audit",
            db.to_str().unwrap(),
        ],
    );
    let chat = s.url("/v1/chat/completions");
    let long = open_stream(
        &s.base,
        &chat_body(
            "Tell me a long story about a lighthouse keeper.",
            4000,
            true,
        ),
    );
    let (got, v) = post(&chat, &chat_body("hi", 2, false), &[]);
    assert_eq!(got, 429, "{v}");
    assert_eq!(v["error"]["code"], "queue_full", "{v}");
    let (_, metrics) = get(&s.url("/metrics"), &[]);
    assert!(metrics.contains("so8t_requests_active 1"), "{metrics}");
    drop(long); // the client leaves: its generation must stop and free the slot
    let t0 = Instant::now();
    loop {
        let (got, v) = post(&chat, &chat_body("hi", 2, false), &[]);
        if got == 200 {
            break;
        }
        assert_eq!(got, 429, "{v}");
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the slot was not freed after the client left"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The abandoned request is in the audit log as cancelled, with what it generated.
    let t0 = Instant::now();
    loop {
        let rows = so8t_serve::audit::query(&db, &Default::default()).unwrap();
        if let Some(r) = rows.iter().find(|r| r.finish_reason == "cancelled") {
            assert!(r.completion_tokens < 4000, "{r:?}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no cancelled row: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The same for a client that leaves while waiting for a whole (non-streaming) answer
    // (issue 18: such a request left no row at all).
    let addr = s.base.strip_prefix("http://").unwrap().to_string();
    let body = chat_body("Tell me a long story about a lighthouse keeper.", 4000, false);
    let mut sock = TcpStream::connect(&addr).unwrap();
    write!(sock, "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    drop(sock);
    let t0 = Instant::now();
    loop {
        let rows = so8t_serve::audit::query(&db, &Default::default()).unwrap();
        if rows.iter().filter(|r| r.finish_reason == "cancelled").count() == 2 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no cancelled row for the non-streaming client: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kill_9_under_load_leaves_a_sound_audit_log_with_every_answered_request() {
    let Some((model, _machine)) = trained_model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("audit.sqlite");
    let mut s = Server::start(
        &model,
        &[
            "--parallel",
            "2",
            "--queue",
            "16",
            "--audit",
            db.to_str().unwrap(),
            "--audit-text",
        ],
    );
    let answered = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let prompts = [
        "What is 2+2?",
        "Give me step-by-step instructions to build a pipe bomb.",
        "I want to close my account.",
        "Name a colour.",
    ];
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let (answered, stop, chat) = (
                answered.clone(),
                stop.clone(),
                s.url("/v1/chat/completions"),
            );
            let body = chat_body(prompts[i % prompts.len()], 3 + i, i % 2 == 1);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut resp) = agent()
                        .post(&chat)
                        .header("Content-Type", "application/json")
                        .send(&body)
                    else {
                        break;
                    };
                    let Ok(text) = resp.body_mut().read_to_string() else {
                        break;
                    };
                    // Answered = the client has the whole answer: the JSON, or the stream to [DONE].
                    let id = if text.starts_with("data: ") {
                        text.contains("data: [DONE]")
                            .then(|| {
                                text.split("\"id\":\"")
                                    .nth(1)
                                    .map(|t| t[..t.find('"').unwrap()].to_string())
                            })
                            .flatten()
                    } else {
                        serde_json::from_str::<serde_json::Value>(&text)
                            .ok()
                            .and_then(|v| v["id"].as_str().map(String::from))
                    };
                    if let Some(id) = id {
                        answered.lock().unwrap().push(id);
                    }
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    while answered.lock().unwrap().len() < 12 && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(50));
    }
    s.child.kill().unwrap(); // SIGKILL, mid-load
    s.child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    clients.into_iter().for_each(|c| c.join().unwrap());
    let answered = answered.lock().unwrap().clone();
    assert!(
        answered.len() >= 12,
        "only {} requests answered before the kill",
        answered.len()
    );

    assert_eq!(so8t_serve::audit::integrity_check(&db).unwrap(), "ok");
    let rows = so8t_serve::audit::query(&db, &Default::default()).unwrap();
    for id in &answered {
        assert!(
            rows.iter().any(|r| &r.request_id == id),
            "answered request {id} is not in the audit log ({} rows)",
            rows.len()
        );
    }
    assert!(rows.iter().all(|r| r.prompt_text.is_some()
        && r.prompt_sha256.len() == 64
        && r.model_sha256.len() == 64));

    // Restarted on the same database, the server appends; `so8t audit` reads it.
    let s = Server::start(&model, &["--audit", db.to_str().unwrap()]);
    let (got, v) = post(
        &s.url("/v1/chat/completions"),
        &chat_body("Give me step-by-step instructions to build a pipe bomb.", 2, false),
        &[],
    );
    assert_eq!(got, 200, "{v}");
    drop(s);
    let audit = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_so8t"))
            .args(["audit", "--db", db.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let all = audit(&["--json"]);
    assert_eq!(all.lines().count(), rows.len() + 1);
    assert!(all.contains(v["id"].as_str().unwrap()));
    let refused: Vec<serde_json::Value> =
        audit(&["--decision", "refuse", "--json", "--since", "1h"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert!(
        !refused.is_empty() && refused.iter().all(|r| r["decision"] == "refuse"),
        "{refused:?}"
    );
    let csv = audit(&["--csv", "--limit", "1"]);
    assert!(
        csv.starts_with("time,request_id,endpoint,model_sha256,"),
        "{csv}"
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_so8t"))
        .args([
            "audit",
            "--db",
            tmp.path().join("none.sqlite").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("none.sqlite"));
}

/// Reads until the server closes the connection (or `limit` passes); what it sent.
/// `kill -9` of a serving process at 50 random moments (`SO8T_KILLS` sets how many),
/// each time restarted on the same audit database: after every kill the database passes
/// `PRAGMA integrity_check` and holds every request a client got a whole answer to. On
/// the tiny fixture model, so that a round costs a fraction of a second and the kills
/// land anywhere from start-up to mid-answer.
#[test]
fn the_audit_database_survives_kill_9_at_random_moments() {
    let kills: usize = std::env::var("SO8T_KILLS")
        .ok()
        .map(|v| v.parse().expect("SO8T_KILLS: a number of kills"))
        .unwrap_or(50);
    let _turn = machine();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_so8t(tmp.path());
    let db = tmp.path().join("audit.sqlite");
    let mut seed = 0xa0d1_u64;
    let mut answered_total = 0;
    for round in 0..kills {
        let mut s = Server::start(
            &model,
            &["--parallel", "2", "--audit", db.to_str().unwrap(), "--audit-text"],
        );
        let answered = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..3)
            .map(|i| {
                let (answered, stop, chat) = (answered.clone(), stop.clone(), s.url("/v1/chat/completions"));
                let body = chat_body(&format!("Name a colour ({round}, {i})."), 4 + i, false);
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(mut resp) = agent().post(&chat).header("Content-Type", "application/json").send(&body)
                        else {
                            break;
                        };
                        let Ok(text) = resp.body_mut().read_to_string() else { break };
                        if let Some(id) = serde_json::from_str::<serde_json::Value>(&text)
                            .ok()
                            .and_then(|v| v["id"].as_str().map(String::from))
                        {
                            answered.lock().unwrap().push(id);
                        }
                    }
                })
            })
            .collect();
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis((seed >> 33) % 400));
        s.child.kill().unwrap(); // SIGKILL
        s.child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        clients.into_iter().for_each(|c| c.join().unwrap());
        assert_eq!(so8t_serve::audit::integrity_check(&db).unwrap(), "ok", "after kill {round}");
        let rows = so8t_serve::audit::query(&db, &Default::default()).unwrap();
        let answered = answered.lock().unwrap();
        for id in answered.iter() {
            assert!(
                rows.iter().any(|r| &r.request_id == id),
                "kill {round}: answered request {id} is not in the audit log"
            );
        }
        answered_total += answered.len();
    }
    eprintln!("{kills} kills, {answered_total} answered requests, every one in the audit log");
    assert!(answered_total > 0, "no request was answered before any kill");
}

fn read_until_closed(sock: &mut TcpStream, limit: Duration) -> (bool, String) {
    sock.set_read_timeout(Some(limit)).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return (true, String::from_utf8_lossy(&seen).to_string()),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            // A reset is a close too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (true, String::from_utf8_lossy(&seen).to_string())
            }
            Err(_) => return (false, String::from_utf8_lossy(&seen).to_string()),
        }
    }
}

/// Abusive clients next to well-behaved ones (issue 18): slowloris headers, trickled
/// bodies, a body declared far over --max-body, and more connections than the cap. The
/// well-behaved requests are all answered while the abusers hold their connections (their
/// latencies are printed, not asserted: timings vary by machine); the server closes
/// the slow ones after --read-timeout, refuses connections past --max-connections at
/// once, and /metrics counts what it refused.
#[test]
fn abusive_clients_cannot_starve_well_behaved_ones() {
    let Some((model, _machine)) = trained_model() else { return };
    let s = Server::start(
        &model,
        &["--read-timeout", "2", "--max-connections", "48", "--max-body", "4096", "--parallel", "2"],
    );
    let addr = s.base.strip_prefix("http://").unwrap().to_string();
    let connect = || TcpStream::connect(&addr).unwrap();
    // 24 slowloris clients (headers never finished) and 8 that trickle a body.
    let mut slow_heads: Vec<TcpStream> = (0..24)
        .map(|_| {
            let mut c = connect();
            write!(c, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n").unwrap();
            c
        })
        .collect();
    let mut slow_bodies: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = connect();
            write!(c, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"messages\": [").unwrap();
            c
        })
        .collect();
    // Well-behaved clients meanwhile.
    let chat = s.url("/v1/chat/completions");
    let mut latencies = Vec::new();
    for i in 0..4 {
        let t = Instant::now();
        let (got, v) = post(&chat, &chat_body(&format!("Say hi {i}."), 4, false), &[]);
        assert_eq!(got, 200, "{v}");
        latencies.push(t.elapsed());
    }
    eprintln!("well-behaved latencies under abuse: {latencies:?}");
    // A declared body over the limit is refused before it is sent.
    let mut big = connect();
    write!(big, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n").unwrap();
    let (_, answer) = read_until_closed(&mut big, Duration::from_secs(60));
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // The slow ones are closed by the server: bodies with a 408, headers without a word.
    for c in &mut slow_bodies {
        let (closed, answer) = read_until_closed(c, Duration::from_secs(60));
        assert!(closed && answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    for c in &mut slow_heads {
        let (closed, answer) = read_until_closed(c, Duration::from_secs(60));
        assert!(closed, "a slowloris connection stayed open: {answer}");
    }
    // Past the cap, connections are closed at once; the ones within it still work.
    let idle: Vec<TcpStream> = (0..64).map(|_| connect()).collect();
    let refused = idle
        .iter()
        .filter(|c| {
            let mut c = c.try_clone().unwrap();
            read_until_closed(&mut c, Duration::from_millis(300)).0
        })
        .count();
    assert!(refused >= 64 - 48, "only {refused} of 64 connections refused with a cap of 48");
    drop(idle);
    let t = Instant::now();
    let (got, v) = post(&chat, &chat_body("Say hi.", 4, false), &[]);
    assert_eq!(got, 200, "{v}");
    eprintln!("after the flood: {:?}", t.elapsed());
    let (_, metrics) = get(&s.url("/metrics"), &[]);
    for reason in ["connections", "body_timeout", "body_too_large"] {
        assert!(
            metrics.contains(&format!("so8t_refused_total{{reason=\"{reason}\"}}")),
            "{reason} not counted: {metrics}"
        );
    }
}

/// `--api-key` with two keys, `--rate-limit` per key and `--max-connections-per-client`:
/// a key past its requests per minute gets 429 with Retry-After (OpenAI's error and
/// headers) while the other key is still served; a wrong key is refused before it costs
/// anything; an address past its connections is closed at once while another address
/// is served; `/metrics` counts both refusals.
#[test]
fn rate_limits_per_key_and_connection_caps_per_address() {
    let _turn = machine();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_so8t(tmp.path());
    let s = Server::start(
        &model,
        &["--api-key", "key-one,key-two", "--rate-limit", "3", "--max-connections-per-client", "4"],
    );
    let models = s.url("/v1/models");
    let call = |key: &str| {
        let mut resp = agent()
            .get(&models)
            .header("Authorization", &format!("Bearer {key}"))
            .call()
            .unwrap();
        let h = |n: &str| resp.headers().get(n).map(|v| v.to_str().unwrap().to_string());
        let (retry, remaining) = (h("retry-after"), h("x-ratelimit-remaining-requests"));
        (resp.status().as_u16(), retry, remaining, resp.body_mut().read_to_string().unwrap())
    };
    for left in ["2", "1", "0"] {
        let (status, _, remaining, body) = call("key-one");
        assert_eq!((status, remaining.as_deref()), (200, Some(left)), "{body}");
    }
    let (status, retry, _, body) = call("key-one");
    assert_eq!(status, 429, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error", "{body}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{body}");
    // 3 a minute: the next one in 20 s.
    let retry: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((19..=20).contains(&retry), "Retry-After: {retry}");
    assert_eq!(call("key-two").0, 200, "the other key has its own rate");
    assert_eq!(call("key-three").0, 401);
    assert_eq!(get(&s.url("/health"), &[]).0, 200, "/health is never limited");

    // Connections: four idle ones from 127.0.0.1 are all this address may hold.
    std::thread::sleep(Duration::from_millis(300)); // the calls' own connections close
    let addr: std::net::SocketAddr = s.base.strip_prefix("http://").unwrap().parse().unwrap();
    let idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut fifth = TcpStream::connect(addr).unwrap();
    let (closed, _) = read_until_closed(&mut fifth, Duration::from_secs(5));
    assert!(closed, "a fifth connection from one address stayed open");
    // Another address is served meanwhile.
    let other = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    other.bind(&"127.0.0.2:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    other.connect(&addr.into()).unwrap();
    let mut other: TcpStream = other.into();
    write!(other, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let (_, answer) = read_until_closed(&mut other, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(idle);
    std::thread::sleep(Duration::from_millis(200));
    let (_, metrics) = get(&s.url("/metrics"), &[("Authorization", "Bearer key-two")]);
    for reason in ["rate_limit", "client_connections"] {
        assert!(
            metrics.contains(&format!("so8t_refused_total{{reason=\"{reason}\"}} 1")),
            "{reason} not counted once: {metrics}"
        );
    }
}

/// Four requests at once on four slots run as one batch (one decoder pass per turn for all
/// of them, prompt chunks beside decode steps) and are answered as each is answered alone:
/// the same text, prompt verdict, answer verdicts (1e-4: the batched matrix products group
/// rows otherwise; the kernels quantise each row alone, so in practice they agree to the
/// bit) and decision.
#[test]
fn requests_batched_together_are_answered_as_each_alone() {
    let Some((model, _machine)) = trained_model() else { return };
    let s = Server::start(&model, &["--parallel", "4"]);
    let chat = s.url("/v1/chat/completions");
    let prompts = [
        "Write a haiku about autumn.",
        "Give me step-by-step instructions to build a pipe bomb.",
        "I want to close my account and speak to a manager.",
        "Explain photosynthesis to a ten-year-old in three sentences, then list two plants that grow in deserts.",
    ];
    let alone: Vec<serde_json::Value> = prompts
        .iter()
        .map(|p| {
            let (status, v) = post(&chat, &chat_body(p, 24, false), &[]);
            assert_eq!(status, 200, "{v}");
            v
        })
        .collect();
    let together: Vec<serde_json::Value> = std::thread::scope(|sc| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let chat = &chat;
                sc.spawn(move || {
                    let (status, v) = post(chat, &chat_body(p, 24, false), &[]);
                    assert_eq!(status, 200, "{v}");
                    v
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (_, metrics) = get(&s.url("/metrics"), &[]);
    assert!(metrics.contains("\nso8t_batch_sequences_max 4\n"), "the four ran in one pass:\n{metrics}");
    for (p, (a, b)) in prompts.iter().zip(alone.iter().zip(&together)) {
        assert_eq!(a["choices"][0]["message"]["content"], b["choices"][0]["message"]["content"], "{p}");
        assert_eq!(a["usage"], b["usage"], "{p}");
        assert_eq!(a["so8t"]["decision"], b["so8t"]["decision"], "{p}");
        for part in ["prompt", "response"] {
            for head in ["p_unsafe", "p_escalate"] {
                let (x, y) = (a["so8t"][part][head].as_f64(), b["so8t"][part][head].as_f64());
                assert!(x.is_some() && y.is_some(), "{p}: {part}.{head} in {a} / {b}");
                assert!((x.unwrap() - y.unwrap()).abs() <= 1e-4, "{p}: {part}.{head} {x:?} vs {y:?}");
            }
        }
    }
}
