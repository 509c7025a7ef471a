//! `qnode bench --multi-turn`: a replay of chat conversations, each turn sending the whole
//! history (system, then alternating user and assistant turns) to an OpenAI-compatible
//! `/v1/chat/completions` endpoint, streamed, greedy. It measures what a chat gateway sees: the
//! time to the first token of every turn as the history grows, how many prompt tokens the
//! server says it served from its prompt cache, and the memory the server holds meanwhile.
//!
//! The same client drives qnode and llama.cpp's `llama-server` (`--server NAME=URL`, several
//! allowed): servers are measured interleaved, level by level, so machine noise hits both. A
//! `grpc://host:port` URL replays the same conversations over qnode's gRPC `GenerateStream`
//! (the session key as `x-session-id` metadata, which is what a load balancer hashes on).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::bench::load_average;

/// Settings of a multi-turn replay (flags of `qnode bench`).
#[derive(Debug, Clone)]
pub struct Replay {
    /// `(name, base URL)` of each server, e.g. `("qnode", "http://127.0.0.1:8080")`.
    pub servers: Vec<(String, String)>,
    /// Model id sent in requests.
    pub model: String,
    /// Conversations run at once, per level.
    pub conversations: Vec<usize>,
    /// Turns per conversation.
    pub turns: usize,
    /// Greedy tokens per reply.
    pub reply_tokens: u32,
    /// `(name, pid)` of processes whose resident memory is sampled during the replay.
    pub watch: Vec<(String, u32)>,
    /// Give up on one request after this long.
    pub timeout: Duration,
    /// Varies the conversations' text between runs (a soak runs many replays, none repeating
    /// another's history).
    pub salt: usize,
}

/// One turn of one conversation as measured.
#[derive(Debug, Clone, Default)]
struct TurnSample {
    ttft: Option<Duration>,
    latency: Duration,
    prompt_tokens: u64,
    cached_tokens: Option<u64>,
    completion_tokens: u64,
}

/// The results of one (server, conversations) level.
struct Level {
    server: String,
    conversations: usize,
    /// `turns[t][c]`.
    turns: Vec<Vec<TurnSample>>,
    errors: usize,
    wall: Duration,
    rss_mb: Vec<(String, f64, f64)>,
    /// `(seconds since the level began, MiB)` of each watched process, every [`RSS_EVERY`].
    rss_series: Vec<(String, Vec<(f64, f64)>)>,
    load: (Option<f64>, Option<f64>),
}

/// How often the watched processes' resident memory is sampled.
const RSS_EVERY: Duration = Duration::from_millis(250);

/// Words user turns are made of (plain English, so token counts look like chat).
const WORDS: &[&str] = &[
    "river", "mountain", "garden", "engine", "library", "window", "market", "bicycle", "kitchen",
    "harbor", "forest", "station", "bridge", "letter", "castle", "island", "teacher", "doctor",
    "painter", "farmer", "sailor", "winter", "summer", "morning", "evening", "music", "story",
    "question", "answer", "history", "science", "weather", "journey", "family", "village", "city",
    "road", "light", "shadow", "stone", "water", "fire", "wind", "cloud", "bread", "coffee",
    "paper", "clock", "door", "table",
];

/// The system turn every conversation starts with.
const SYSTEM: &str = "You are a friendly assistant in a group chat. Keep answers short, \
                      concrete and polite, and remember what was said before.";

/// User turn `t` of conversation `c`: about 60–100 tokens of varied text, different for every
/// (server level, conversation, turn) so nothing is an exact repeat across levels.
fn user_turn(level_salt: usize, c: usize, t: usize) -> String {
    let mut state = (level_salt as u64 + 1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((c as u64) << 32 | t as u64);
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let words = 45 + (next() % 20) as usize;
    let mut s = format!("Chat {c}-{level_salt}, message {t}: ");
    for i in 0..words {
        let w = WORDS[(next() % WORDS.len() as u64) as usize];
        s.push_str(w);
        s.push(if i % 9 == 8 { '.' } else { ' ' });
        if i % 9 == 8 {
            s.push(' ');
        }
    }
    s.push_str(" What do you think about that?");
    s
}

/// Run every level for every server (interleaved) and print the tables.
pub async fn run(replay: Replay) -> anyhow::Result<()> {
    if replay.servers.is_empty() || replay.turns == 0 || replay.conversations.contains(&0) {
        bail!("--multi-turn needs at least one --server, --turns >= 1 and conversations >= 1");
    }
    let mut levels = Vec::new();
    for (i, &c) in replay.conversations.iter().enumerate() {
        for (j, (name, url)) in replay.servers.iter().enumerate() {
            // Every (level, server) replays its own conversations: two servers that share a
            // store (qnode's HTTP and gRPC fronts) must not find each other's history.
            let salt = replay.salt * 1000 + i * 16 + j;
            eprintln!("{name}: {c} conversations x {} turns ...", replay.turns);
            let level = run_level(&replay, name, url, c, salt).await?;
            eprintln!(
                "{name}: C={c} done in {:.1} s, {} errors",
                level.wall.as_secs_f64(),
                level.errors
            );
            levels.push(level);
        }
    }
    print!("{}", report(&replay, &levels));
    Ok(())
}

async fn run_level(
    replay: &Replay,
    name: &str,
    url: &str,
    c: usize,
    salt: usize,
) -> anyhow::Result<Level> {
    let watch = replay.watch.clone();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(async move {
        let began = Instant::now();
        let mut seen: Vec<(String, f64, f64)> = watch
            .iter()
            .map(|(n, _)| (n.clone(), f64::MAX, 0.0))
            .collect();
        let mut series: Vec<(String, Vec<(f64, f64)>)> =
            watch.iter().map(|(n, _)| (n.clone(), Vec::new())).collect();
        loop {
            let at = began.elapsed().as_secs_f64();
            for (((_, pid), s), (_, points)) in watch.iter().zip(seen.iter_mut()).zip(&mut series) {
                if let Some(mb) = rss_mb(*pid) {
                    s.1 = s.1.min(mb);
                    s.2 = s.2.max(mb);
                    points.push((at, mb));
                }
            }
            tokio::select! {
                _ = stop_rx.changed() => break,
                _ = tokio::time::sleep(RSS_EVERY) => {}
            }
        }
        (seen, series)
    });
    let load_before = load_average();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for conv in 0..c {
        let replay = replay.clone();
        let url = url.to_string();
        let session = format!("bench-{name}-{salt}-{conv}");
        tasks.spawn(async move {
            let mut history = vec![json!({"role": "system", "content": SYSTEM})];
            let mut samples = Vec::with_capacity(replay.turns);
            let mut errors = 0;
            for t in 0..replay.turns {
                history.push(json!({"role": "user", "content": user_turn(salt, conv, t)}));
                let body = json!({
                    "model": replay.model,
                    "messages": history,
                    "max_tokens": replay.reply_tokens,
                    "temperature": 0.0,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                    "user": session,
                });
                let call = async {
                    if url.starts_with("grpc://") {
                        grpc_turn(&url, &session, &replay.model, &history, replay.reply_tokens)
                            .await
                    } else {
                        chat_turn(&url, &session, body.to_string()).await
                    }
                };
                match tokio::time::timeout(replay.timeout, call).await {
                    Ok(Ok((text, sample))) => {
                        history.push(json!({"role": "assistant", "content": text}));
                        samples.push(sample);
                    }
                    Ok(Err(e)) => {
                        eprintln!("{session} turn {t}: {e:#}");
                        errors += 1;
                        break;
                    }
                    Err(_) => {
                        eprintln!("{session} turn {t}: timed out");
                        errors += 1;
                        break;
                    }
                }
            }
            (conv, samples, errors)
        });
    }
    let mut turns = vec![Vec::new(); replay.turns];
    let mut errors = 0;
    while let Some(done) = tasks.join_next().await {
        let (_, samples, e) = done.context("conversation task")?;
        errors += e;
        for (t, s) in samples.into_iter().enumerate() {
            turns[t].push(s);
        }
    }
    let wall = start.elapsed();
    let _ = stop_tx.send(true);
    let (rss, rss_series) = sampler.await.unwrap_or_default();
    Ok(Level {
        server: name.to_string(),
        conversations: c,
        turns,
        errors,
        wall,
        rss_mb: rss,
        rss_series,
        load: (load_before, load_average()),
    })
}

/// One streamed chat completion: the reply text and its measurements.
async fn chat_turn(url: &str, session: &str, body: String) -> anyhow::Result<(String, TurnSample)> {
    let start = Instant::now();
    let mut text = String::new();
    let mut sample = TurnSample::default();
    let mut on_event = |v: &Value| {
        if let Some(delta) = v
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            if !delta.is_empty() && sample.ttft.is_none() {
                sample.ttft = Some(start.elapsed());
            }
            text.push_str(delta);
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            sample.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
            sample.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
            if let Some(c) = u
                .pointer("/prompt_tokens_details/cached_tokens")
                .and_then(Value::as_u64)
            {
                sample.cached_tokens = Some(c);
            }
        }
        // llama-server reports its prompt cache in `timings.cache_n`.
        if let Some(c) = v.pointer("/timings/cache_n").and_then(Value::as_u64) {
            sample.cached_tokens = Some(c);
        }
    };
    post_sse(url, "/v1/chat/completions", session, &body, &mut on_event).await?;
    sample.latency = start.elapsed();
    Ok((text, sample))
}

/// One streamed turn over qnode's gRPC `GenerateStream`: the reply text and its measurements.
/// The session key goes as `x-session-id` metadata (what deploy/nginx hashes on).
async fn grpc_turn(
    url: &str,
    session: &str,
    model: &str,
    history: &[Value],
    reply_tokens: u32,
) -> anyhow::Result<(String, TurnSample)> {
    use qnode::grpc::proto;
    let start = Instant::now();
    let endpoint = format!("http://{}", url.trim_start_matches("grpc://"));
    let channel = tonic::transport::Endpoint::from_shared(endpoint)?
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let messages = history
        .iter()
        .map(|m| proto::ChatMessage {
            role: m["role"].as_str().unwrap_or_default().to_string(),
            content: m["content"].as_str().unwrap_or_default().to_string(),
            ..Default::default()
        })
        .collect();
    let mut request = tonic::Request::new(proto::GenerateRequest {
        model: model.to_string(),
        messages,
        max_tokens: Some(reply_tokens),
        temperature: Some(0.0),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-session-id", session.parse().context("session key")?);
    let mut stream = proto::inference_client::InferenceClient::new(channel)
        .generate_stream(request)
        .await?
        .into_inner();
    let mut text = String::new();
    let mut sample = TurnSample::default();
    while let Some(chunk) = stream.message().await? {
        if !chunk.text.is_empty() && sample.ttft.is_none() {
            sample.ttft = Some(start.elapsed());
        }
        text.push_str(&chunk.text);
        if let Some(u) = chunk.usage {
            sample.prompt_tokens = u64::from(u.prompt_tokens);
            sample.completion_tokens = u64::from(u.completion_tokens);
            sample.cached_tokens = Some(u64::from(u.cached_prompt_tokens));
        }
    }
    sample.latency = start.elapsed();
    Ok((text, sample))
}

/// POST `body` and feed every `data:` JSON event of the SSE reply (or the one JSON body of a
/// non-streamed reply) to `on_event`. A minimal
/// HTTP/1.1 client (one request per connection, chunked or close-delimited bodies), so the
/// bench needs no HTTP client dependency.
pub(super) async fn post_sse(
    url: &str,
    path: &str,
    session: &str,
    body: &str,
    on_event: &mut (dyn FnMut(&Value) + Send),
) -> anyhow::Result<()> {
    let host = url
        .strip_prefix("http://")
        .context("--server URLs must start with http:// (OpenAI) or grpc:// (qnode gRPC)")?
        .trim_end_matches('/');
    let mut stream = TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to {host}"))?;
    stream.set_nodelay(true)?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Accept: text/event-stream\r\nx-session-id: {session}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    // Headers.
    let header_end = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("connection closed before the response headers");
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(p) = find(&raw, b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&raw[..header_end]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head.contains("transfer-encoding: chunked");
    let mut body_in: Vec<u8> = raw[header_end..].to_vec();
    let mut decoded: Vec<u8> = Vec::new();
    let mut lines = LineSplitter::default();
    let mut done = false;
    let mut finished_stream = false;
    loop {
        if chunked {
            // Decode every complete chunk buffered so far.
            while let Some(eol) = find(&body_in, b"\r\n") {
                let size_str = String::from_utf8_lossy(&body_in[..eol]);
                let size =
                    usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
                        .with_context(|| format!("bad chunk size {size_str:?}"))?;
                if size == 0 {
                    finished_stream = true;
                    break;
                }
                if body_in.len() < eol + 2 + size + 2 {
                    break;
                }
                decoded.extend_from_slice(&body_in[eol + 2..eol + 2 + size]);
                body_in.drain(..eol + 2 + size + 2);
            }
        } else {
            decoded.append(&mut body_in);
        }
        if status != 200 {
            if finished_stream {
                break;
            }
        } else {
            for line in lines.push(&mut decoded) {
                // SSE `data:` lines; a non-streamed reply is one JSON line of its own.
                let data = line.strip_prefix("data:").unwrap_or(&line).trim();
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                if let Ok(v) = serde_json::from_str::<Value>(data) {
                    on_event(&v);
                }
            }
        }
        if finished_stream || done {
            break;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        body_in.extend_from_slice(&buf[..n]);
    }
    // A body that did not end in a newline (a non-streamed JSON reply).
    if status == 200 {
        if let Ok(v) = serde_json::from_slice::<Value>(&lines.partial) {
            on_event(&v);
        }
    }
    if status != 200 {
        bail!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&decoded)
                .chars()
                .take(300)
                .collect::<String>()
        );
    }
    Ok(())
}

/// Splits a byte stream into text lines, keeping a partial last line for the next push.
#[derive(Default)]
struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    fn push(&mut self, data: &mut Vec<u8>) -> Vec<String> {
        self.partial.append(data);
        let mut out = Vec::new();
        while let Some(p) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=p).collect();
            out.push(String::from_utf8_lossy(&line).trim_end().to_string());
        }
        out
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Resident memory of process `pid` in MiB (Linux).
fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = xs.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn ttft_ms(samples: &[TurnSample]) -> Option<f64> {
    mean(
        samples
            .iter()
            .filter_map(|s| s.ttft)
            .map(|d| d.as_secs_f64() * 1e3),
    )
}

fn fmt_opt(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

/// The markdown tables: per level, per turn; then a summary row per level.
fn report(replay: &Replay, levels: &[Level]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "model `{}`, {} turns, replies of {} greedy tokens, streamed over /v1/chat/completions (gRPC GenerateStream for grpc:// servers)\n",
        replay.model, replay.turns, replay.reply_tokens
    );
    for level in levels {
        let _ = writeln!(
            out,
            "### {} — {} conversation(s)\n\n| turn | TTFT mean ms | prompt tokens | cached tokens | cached % |\n|---|---|---|---|---|",
            level.server, level.conversations
        );
        for (t, samples) in level.turns.iter().enumerate() {
            let prompt = mean(samples.iter().map(|s| s.prompt_tokens as f64));
            let cached = mean(
                samples
                    .iter()
                    .filter_map(|s| s.cached_tokens.map(|c| c as f64)),
            );
            let pct = match (prompt, cached) {
                (Some(p), Some(c)) if p > 0.0 => Some(100.0 * c / p),
                _ => None,
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                t + 1,
                fmt_opt(ttft_ms(samples), 0),
                fmt_opt(prompt, 0),
                fmt_opt(cached, 0),
                fmt_opt(pct, 1)
            );
        }
        let _ = writeln!(out);
    }
    for level in levels {
        for (name, points) in &level.rss_series {
            let Some(&(end, _)) = points.last() else {
                continue;
            };
            // About 20 points per level, whatever its length.
            let every = (end / 20.0).max(RSS_EVERY.as_secs_f64());
            let mut next = 0.0;
            let mut line = String::new();
            for &(at, mb) in points {
                if at >= next {
                    let _ = write!(line, " {at:.0}s {mb:.0},");
                    next = at + every;
                }
            }
            let _ = writeln!(
                out,
                "RSS of {name} during {} C={} (s MiB):{}\n",
                level.server,
                level.conversations,
                line.trim_end_matches(',')
            );
        }
    }
    let _ = writeln!(
        out,
        "| server | C | first-turn TTFT ms | last-turn TTFT ms | last / first | cached % of prompt (turns 2..) | gen tok/s | wall s | errors | RSS MiB min–max | load 1m before → after |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for level in levels {
        let first = level.turns.first().and_then(|s| ttft_ms(s));
        let last = level.turns.last().and_then(|s| ttft_ms(s));
        let later: Vec<&TurnSample> = level.turns.iter().skip(1).flatten().collect();
        let prompt: u64 = later.iter().map(|s| s.prompt_tokens).sum();
        let cached: Option<u64> = later
            .iter()
            .map(|s| s.cached_tokens)
            .try_fold(0u64, |a, c| c.map(|c| a + c));
        let pct = cached
            .filter(|_| prompt > 0)
            .map(|c| 100.0 * c as f64 / prompt as f64);
        let generated: u64 = level
            .turns
            .iter()
            .flatten()
            .map(|s| s.completion_tokens)
            .sum();
        let rss = level
            .rss_mb
            .iter()
            .filter(|r| r.2 > 0.0)
            .map(|(n, lo, hi)| format!("{n} {lo:.0}–{hi:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        let ratio = match (first, last) {
            (Some(f), Some(l)) if f > 0.0 => Some(l / f),
            _ => None,
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {} | {} → {} |",
            level.server,
            level.conversations,
            fmt_opt(first, 0),
            fmt_opt(last, 0),
            fmt_opt(ratio, 2),
            fmt_opt(pct, 1),
            generated as f64 / level.wall.as_secs_f64().max(1e-9),
            level.wall.as_secs_f64(),
            level.errors,
            if rss.is_empty() { "-".into() } else { rss },
            fmt_opt(level.load.0, 2),
            fmt_opt(level.load.1, 2),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_turns_are_distinct_and_chat_sized() {
        let a = user_turn(0, 0, 0);
        assert_ne!(a, user_turn(0, 0, 1));
        assert_ne!(a, user_turn(0, 1, 0));
        assert_ne!(a, user_turn(1, 0, 0));
        let words = a.split_whitespace().count();
        assert!((45..80).contains(&words), "{words} words");
    }

    #[test]
    fn lines_split_across_pushes() {
        let mut s = LineSplitter::default();
        assert!(s.push(&mut b"data: {\"a\"".to_vec()).is_empty());
        assert_eq!(
            s.push(&mut b":1}\n\ndata: [DONE]\n".to_vec()),
            vec!["data: {\"a\":1}", "", "data: [DONE]"]
        );
    }
}
