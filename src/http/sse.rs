//! Streamed answers as server-sent events: `data: {chunk}\n\n` per delta, the last content chunk
//! with `finish_reason`, an optional usage chunk with no choices (`stream_options.include_usage`),
//! then `data: [DONE]\n\n`. A failure after the stream began is one `data: {"error": ...}` event
//! and no `[DONE]` (how OpenAI's clients tell it apart from an answer).
//!
//! The events come from [`crate::front::forward`], the loop the gRPC stream uses too.

use std::convert::Infallible;

use axum::body::Bytes;
use serde::Serialize;

use super::convert::{chat_logprobs, finish_reason, text_logprobs, usage};
use super::error::ApiError;
use super::types::{
    ChatCompletionChunk, ChunkChoice, Delta, PromptTokensDetails, TextChoice, TextCompletion, Usage,
};
use crate::front::{Call, FrontError, Step, StreamFront};
use crate::types::Completion;

/// What goes down the HTTP body: one or more whole events.
pub type Item = Result<Bytes, Infallible>;

fn event(value: &impl Serialize) -> String {
    // Our own types only; serialization cannot fail.
    let json = serde_json::to_string(value).unwrap_or_default();
    format!("data: {json}\n\n")
}

const DONE: &str = "data: [DONE]\n\n";

fn failure(error: &FrontError) -> Item {
    Ok(failure_event(error))
}

fn failure_event(error: &FrontError) -> Bytes {
    let error = ApiError::from(error.clone());
    Bytes::from(format!("data: {}\n\n", error.body_json()))
}

/// `chat.completion.chunk` events.
pub struct ChatStream {
    /// `chatcmpl-<request id>`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model.
    pub model: String,
    /// End with a usage chunk.
    pub include_usage: bool,
    /// Whether the first chunk (the one with the role) went out.
    pub sent_role: bool,
    /// A request with tools: its output is held back and read at the end (see
    /// [`ToolBuffer`]); `None` streams text as it comes.
    pub tools: Option<ToolBuffer>,
}

/// The output of a streamed request with tools, a JSON object read by [`crate::tools`]: the
/// text of a `{"response": ...}` answer is sent as it is written (with the log-probabilities of
/// its tokens); a call is held back and sent whole in one chunk at the end
/// (`delta.tool_calls[0]` with `index`, `id`, `type`, `function.name` and `function.arguments`,
/// which OpenAI's clients accept as they accept fragments), with the log-probabilities of all
/// its tokens.
#[derive(Debug, Default)]
pub struct ToolBuffer {
    reader: crate::tools::StreamReader,
    logprobs: Vec<crate::types::TokenLogprob>,
}

impl ChatStream {
    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<super::types::Usage>) -> String {
        self.chunk_from(choices, usage, None)
    }

    /// A chunk; `source` (the last and usage chunks) sets `system_fingerprint`.
    fn chunk_from(
        &self,
        choices: Vec<ChunkChoice>,
        usage: Option<super::types::Usage>,
        source: Option<crate::types::Source>,
    ) -> String {
        event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: source.map(super::convert::fingerprint),
        })
    }

    /// The finish chunk, the usage chunk when asked for, then `[DONE]`.
    fn end(&self, last: ChunkChoice, completion: &crate::types::Completion) -> String {
        let source = Some(completion.source);
        let usage_chunk = self
            .include_usage
            .then(|| self.chunk_from(Vec::new(), Some(usage(completion)), source));
        closing(self.chunk_from(vec![last], None, source), usage_chunk)
    }

    fn role(&mut self) -> Option<&'static str> {
        (!std::mem::replace(&mut self.sent_role, true)).then_some("assistant")
    }
}

impl StreamFront for ChatStream {
    type Item = Item;

    fn step(&mut self, _call: &Call, step: &Step) -> Vec<Item> {
        if let Some(buffer) = &mut self.tools {
            match step {
                Step::Delta(text, logprobs) => {
                    buffer.logprobs.extend_from_slice(logprobs);
                    let text = buffer.reader.push(text);
                    if text.is_empty() {
                        return Vec::new();
                    }
                    let logprobs = std::mem::take(&mut buffer.logprobs);
                    let choice = ChunkChoice {
                        index: 0,
                        delta: Delta {
                            role: self.role(),
                            content: Some(text),
                            tool_calls: None,
                        },
                        finish_reason: None,
                        logprobs: (!logprobs.is_empty()).then(|| chat_logprobs(&logprobs)),
                    };
                    return vec![Ok(Bytes::from(self.chunk(vec![choice], None)))];
                }
                Step::Finished(completion) => {
                    let buffer = std::mem::take(buffer);
                    let (content, tool_calls, finish) =
                        super::convert::answer(buffer.reader.raw(), completion.finish_reason);
                    // Text already sent is not sent again.
                    let content = content
                        .map(|c| buffer.reader.rest(&c).to_owned())
                        .filter(|c| !c.is_empty() || !buffer.reader.is_text());
                    let tool_calls = tool_calls.map(|calls| {
                        calls
                            .into_iter()
                            .enumerate()
                            .map(|(i, mut c)| {
                                c.index = Some(i as u32);
                                c
                            })
                            .collect()
                    });
                    let mut text = String::new();
                    if content.is_some() || tool_calls.is_some() || !buffer.logprobs.is_empty() {
                        let answer = ChunkChoice {
                            index: 0,
                            delta: Delta {
                                role: self.role(),
                                content,
                                tool_calls,
                            },
                            finish_reason: None,
                            logprobs: (!buffer.logprobs.is_empty())
                                .then(|| chat_logprobs(&buffer.logprobs)),
                        };
                        text.push_str(&self.chunk(vec![answer], None));
                    }
                    let last = ChunkChoice {
                        index: 0,
                        delta: Delta {
                            role: self.role(),
                            ..Delta::default()
                        },
                        finish_reason: Some(finish),
                        logprobs: None,
                    };
                    text.push_str(&self.end(last, completion));
                    return vec![Ok(Bytes::from(text))];
                }
            }
        }
        let text = match step {
            Step::Delta(text, logprobs) if text.is_empty() && logprobs.is_empty() => {
                return Vec::new()
            }
            Step::Delta(text, logprobs) => {
                let choice = ChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: self.role(),
                        content: Some(text.clone()),
                        tool_calls: None,
                    },
                    finish_reason: None,
                    logprobs: (!logprobs.is_empty()).then(|| chat_logprobs(logprobs)),
                };
                self.chunk(vec![choice], None)
            }
            Step::Finished(completion) => {
                let choice = ChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: self.role(),
                        content: None,
                        tool_calls: None,
                    },
                    finish_reason: Some(finish_reason(completion.finish_reason)),
                    logprobs: None,
                };
                self.end(choice, completion)
            }
        };
        vec![Ok(Bytes::from(text))]
    }

    fn failed(&mut self, _call: &Call, error: &FrontError) -> Item {
        failure(error)
    }
}

/// The end of a stream: the finish chunk, the usage chunk when asked for, then `[DONE]`.
fn closing(mut last: String, usage_chunk: Option<String>) -> String {
    if let Some(usage) = usage_chunk {
        last.push_str(&usage);
    }
    last.push_str(DONE);
    last
}

/// `text_completion` events (`/v1/completions`).
#[derive(Clone)]
pub struct TextStream {
    /// `cmpl-<request id>`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model.
    pub model: String,
    /// End with a usage chunk.
    pub include_usage: bool,
    /// Where the next token's text starts in the completion, in characters (`text_offset`).
    pub text_offset: u32,
}

impl TextStream {
    fn chunk(&self, choices: Vec<TextChoice>, usage: Option<super::types::Usage>) -> String {
        self.chunk_from(choices, usage, None)
    }

    /// A chunk; `source` (the last and usage chunks of one prompt's stream) sets
    /// `system_fingerprint`.
    fn chunk_from(
        &self,
        choices: Vec<TextChoice>,
        usage: Option<super::types::Usage>,
        source: Option<crate::types::Source>,
    ) -> String {
        event(&TextCompletion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: source.map(super::convert::fingerprint),
        })
    }
}

impl StreamFront for TextStream {
    type Item = Item;

    fn step(&mut self, _call: &Call, step: &Step) -> Vec<Item> {
        let text = match step {
            Step::Delta(text, logprobs) if text.is_empty() && logprobs.is_empty() => {
                return Vec::new()
            }
            Step::Delta(text, logprobs) => {
                let logprobs =
                    (!logprobs.is_empty()).then(|| text_logprobs(logprobs, &mut self.text_offset));
                self.chunk(
                    vec![TextChoice {
                        index: 0,
                        text: text.clone(),
                        finish_reason: None,
                        logprobs,
                    }],
                    None,
                )
            }
            Step::Finished(completion) => {
                let last = self.chunk_from(
                    vec![TextChoice {
                        index: 0,
                        text: String::new(),
                        finish_reason: Some(finish_reason(completion.finish_reason)),
                        logprobs: None,
                    }],
                    None,
                    Some(completion.source),
                );
                let usage_chunk = self.include_usage.then(|| {
                    self.chunk_from(Vec::new(), Some(usage(completion)), Some(completion.source))
                });
                closing(last, usage_chunk)
            }
        };
        vec![Ok(Bytes::from(text))]
    }

    fn failed(&mut self, _call: &Call, error: &FrontError) -> Item {
        failure(error)
    }
}

/// What one prompt of a streamed batch sends to [`merge`].
pub enum Piece {
    /// A whole `data:` event for the client.
    Event(Bytes),
    /// The prompt is answered (its finish chunk went out as an [`Piece::Event`] before).
    Finished(Completion),
    /// The prompt failed: the error event; the whole stream ends with it.
    Failed(Bytes),
}

/// `text_completion` events of one prompt of a batch (`/v1/completions` with a list of prompts):
/// its choices carry the prompt's `index`; the usage chunk and `[DONE]` are [`merge`]'s.
pub struct IndexedText {
    /// The stream's spelling (id, created, model); its `include_usage` is ignored here.
    pub text: TextStream,
    /// The prompt's position in `prompt`.
    pub index: u32,
}

impl StreamFront for IndexedText {
    type Item = Piece;

    fn step(&mut self, _call: &Call, step: &Step) -> Vec<Piece> {
        let (text, finish, logprobs) = match step {
            Step::Delta(text, logprobs) if text.is_empty() && logprobs.is_empty() => {
                return Vec::new()
            }
            Step::Delta(text, logprobs) => (
                text.clone(),
                None,
                (!logprobs.is_empty()).then(|| text_logprobs(logprobs, &mut self.text.text_offset)),
            ),
            Step::Finished(c) => (String::new(), Some(finish_reason(c.finish_reason)), None),
        };
        let choice = TextChoice {
            index: self.index,
            text,
            finish_reason: finish,
            logprobs,
        };
        let mut pieces = vec![Piece::Event(Bytes::from(
            self.text.chunk(vec![choice], None),
        ))];
        if let Step::Finished(c) = step {
            pieces.push(Piece::Finished(c.clone()));
        }
        pieces
    }

    fn failed(&mut self, _call: &Call, error: &FrontError) -> Piece {
        Piece::Failed(failure_event(error))
    }
}

/// The token counts of a batch: every prompt's, summed.
pub fn summed_usage<'a>(completions: impl IntoIterator<Item = &'a Completion>) -> Usage {
    let mut total = Usage {
        prompt_tokens: 0,
        completion_tokens: 0,
        total_tokens: 0,
        prompt_tokens_details: PromptTokensDetails { cached_tokens: 0 },
    };
    for c in completions {
        let u = usage(c);
        total.prompt_tokens = total.prompt_tokens.saturating_add(u.prompt_tokens);
        total.completion_tokens = total.completion_tokens.saturating_add(u.completion_tokens);
        total.total_tokens = total.total_tokens.saturating_add(u.total_tokens);
        let cached = &mut total.prompt_tokens_details.cached_tokens;
        *cached = cached.saturating_add(u.prompt_tokens_details.cached_tokens);
    }
    total
}

/// Interleaves the events of a batch's prompts, as they come, into one stream; when every prompt
/// is answered, the summed usage chunk (when asked for) and `[DONE]`. The first failure ends the
/// stream with its error event, and returning drops every prompt's channel, which cancels the
/// others (as does the client leaving).
pub async fn merge(
    text: TextStream,
    prompts: Vec<tokio::sync::mpsc::Receiver<Piece>>,
    tx: tokio::sync::mpsc::Sender<Item>,
) {
    use tokio_stream::StreamExt;
    let n = prompts.len();
    let mut pieces = tokio_stream::StreamMap::new();
    for (i, rx) in prompts.into_iter().enumerate() {
        pieces.insert(i, tokio_stream::wrappers::ReceiverStream::new(rx));
    }
    let mut finished = Vec::with_capacity(n);
    loop {
        let piece = tokio::select! {
            biased;
            () = tx.closed() => return,
            piece = pieces.next() => piece,
        };
        let bytes = match piece {
            None => break,
            Some((_, Piece::Finished(c))) => {
                finished.push(c);
                continue;
            }
            Some((_, Piece::Event(bytes))) => bytes,
            Some((_, Piece::Failed(bytes))) => {
                let _ = tx.send(Ok(bytes)).await;
                return;
            }
        };
        if tx.send(Ok(bytes)).await.is_err() {
            return;
        }
    }
    if finished.len() < n {
        // A prompt's loop ended without a result or an error (a bug): not an answer.
        let error = FrontError::new(
            crate::types::ErrorKind::Internal,
            "internal_error",
            "a prompt of the batch ended without a result",
        );
        let _ = tx.send(failure(&error)).await;
        return;
    }
    let usage_chunk = text
        .include_usage
        .then(|| text.chunk(Vec::new(), Some(summed_usage(&finished))));
    let _ = tx
        .send(Ok(Bytes::from(closing(String::new(), usage_chunk))))
        .await;
}
