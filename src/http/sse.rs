//! Streamed answers as server-sent events: `data: {chunk}\n\n` per delta, the last content chunk
//! with `finish_reason`, an optional usage chunk with no choices (`stream_options.include_usage`),
//! then `data: [DONE]\n\n`. A failure after the stream began is one `data: {"error": ...}` event
//! and no `[DONE]` (how OpenAI's clients tell it apart from an answer).
//!
//! The events come from [`crate::front::forward`], the loop the gRPC stream uses too.

use std::convert::Infallible;

use axum::body::Bytes;
use serde::Serialize;

use super::convert::{finish_reason, usage};
use super::error::ApiError;
use super::types::{ChatCompletionChunk, ChunkChoice, Delta, TextChoice, TextCompletion};
use crate::front::{Call, FrontError, Step, StreamFront};

/// What goes down the HTTP body: one or more whole events.
pub type Item = Result<Bytes, Infallible>;

fn event(value: &impl Serialize) -> String {
    // Our own types only; serialization cannot fail.
    let json = serde_json::to_string(value).unwrap_or_default();
    format!("data: {json}\n\n")
}

const DONE: &str = "data: [DONE]\n\n";

fn failure(error: &FrontError) -> Item {
    let error = ApiError::from(error.clone());
    Ok(Bytes::from(format!("data: {}\n\n", error.body_json())))
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
}

impl ChatStream {
    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<super::types::Usage>) -> String {
        event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    fn role(&mut self) -> Option<&'static str> {
        (!std::mem::replace(&mut self.sent_role, true)).then_some("assistant")
    }
}

impl StreamFront for ChatStream {
    type Item = Item;

    fn step(&mut self, _call: &Call, step: &Step) -> Vec<Item> {
        let text = match step {
            Step::Delta(text) if text.is_empty() => return Vec::new(),
            Step::Delta(text) => {
                let choice = ChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: self.role(),
                        content: Some(text.clone()),
                    },
                    finish_reason: None,
                };
                self.chunk(vec![choice], None)
            }
            Step::Finished(completion) => {
                let choice = ChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: self.role(),
                        content: None,
                    },
                    finish_reason: Some(finish_reason(completion.finish_reason)),
                };
                let usage_chunk = self
                    .include_usage
                    .then(|| self.chunk(Vec::new(), Some(usage(completion))));
                closing(self.chunk(vec![choice], None), usage_chunk)
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
pub struct TextStream {
    /// `cmpl-<request id>`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model.
    pub model: String,
    /// End with a usage chunk.
    pub include_usage: bool,
}

impl TextStream {
    fn chunk(&self, choices: Vec<TextChoice>, usage: Option<super::types::Usage>) -> String {
        event(&TextCompletion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }
}

impl StreamFront for TextStream {
    type Item = Item;

    fn step(&mut self, _call: &Call, step: &Step) -> Vec<Item> {
        let text = match step {
            Step::Delta(text) if text.is_empty() => return Vec::new(),
            Step::Delta(text) => self.chunk(
                vec![TextChoice {
                    index: 0,
                    text: text.clone(),
                    finish_reason: None,
                    logprobs: None,
                }],
                None,
            ),
            Step::Finished(completion) => {
                let last = self.chunk(
                    vec![TextChoice {
                        index: 0,
                        text: String::new(),
                        finish_reason: Some(finish_reason(completion.finish_reason)),
                        logprobs: None,
                    }],
                    None,
                );
                let usage_chunk = self
                    .include_usage
                    .then(|| self.chunk(Vec::new(), Some(usage(completion))));
                closing(last, usage_chunk)
            }
        };
        vec![Ok(Bytes::from(text))]
    }

    fn failed(&mut self, _call: &Call, error: &FrontError) -> Item {
        failure(error)
    }
}
