//! A tool call end to end through a chat template that reads `tools`: Qwen2.5-Instruct's real
//! template (tests/data/templates, whose rendering tests/template_reference.rs checks against
//! transformers') on a tiny random model, served by the whole node over the OpenAI front.
//!
//! What holds: the prompt the node builds carries the template's own `<tools>` block (each tool
//! printed as Python's `json.dumps` prints it) and a request's `usage.prompt_tokens` is that
//! prompt's length; `tool_choice: required` answers with a call of a declared function whose
//! arguments validate; the follow-up turn (the assistant's call, the tool's result) renders through
//! the template's own `<tool_call>` / `<tool_response>` markup.

mod common;

use std::process::Command;
use std::sync::Arc;

use candle_core::Device;
use qnode::app::Generator;
use qnode::config::{Config, ModelConfig};
use qnode::engine::Backend;
use qnode::pool::metrics::PoolMetrics;
use qnode::pool::ModelPool;
use qnode::types::{ChatMessage, PromptInput, TemplateKwargs, Tool, ToolCall, ToolChoice, Tools};
use serde_json::{json, Value};

const WEATHER: &str = r#"{"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": false}"#;

fn qwen_template() -> String {
    std::fs::read_to_string(
        common::repo_root().join("tests/data/templates/Qwen-Qwen2.5-7B-Instruct.jinja"),
    )
    .unwrap()
}

fn tools() -> Tools {
    Tools {
        tools: vec![Tool {
            name: "get_weather".into(),
            description: Some("Current weather in a city".into()),
            parameters: WEATHER.into(),
        }],
        choice: ToolChoice::Required,
    }
}

fn http_tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": serde_json::from_str::<Value>(WEATHER).unwrap()}}])
}

async fn post(url: String, body: Value) -> (u16, Value) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}"])
            .args(["-H", "Content-Type: application/json", "-d"])
            .arg(body.to_string())
            .arg(url)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (
            code.parse().unwrap(),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_through_qwen_templates_tools_block() {
    let dir = tempfile::tempdir().unwrap();
    // A file's model id is its stem.
    let path = dir.path().join("tiny.gguf");
    qnode::model::tiny::write_tiny_llama_with_template(&path, 11, &qwen_template(), 4096).unwrap();
    let mut cfg = ModelConfig::new(path.to_str().unwrap());
    cfg.threads_per_instance = Some(1);
    let pool = ModelPool::new(&[cfg], PoolMetrics::unregistered(), Device::Cpu).unwrap();
    pool.load_all().unwrap();
    let model = pool.loaded("tiny").unwrap();
    assert!(
        model.template.as_ref().unwrap().reads_tools(),
        "Qwen2.5's template reads `tools`"
    );

    // The prompt: the template's own tools block, the tool as json.dumps prints it.
    let question = vec![ChatMessage::text("user", "Weather in Paris?")];
    let ids = model
        .prompt_tokens_for(
            &PromptInput::Chat(question.clone()),
            &TemplateKwargs::new(),
            Some(&tools()),
        )
        .unwrap();
    // (Decoding leaves the control tokens out.)
    let prompt = model.tokenizer.decode(&ids).unwrap();
    let block = format!(
        "<tools>\n{}\n</tools>",
        r#"{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": false}}}"#
    );
    assert!(
        prompt.contains(&block),
        "the template's tools block: {prompt}"
    );
    assert!(
        prompt.contains("\n\n# Tools\n\nYou may call one or more functions"),
        "{prompt}"
    );

    let identities = common::identities("tiny", &model);
    let node = common::serve_both(
        Config::default(),
        Generator::Backend {
            backend: Arc::new(pool) as Arc<dyn Backend>,
            identities,
        },
    )
    .await;
    let url = format!("{}/v1/chat/completions", node.http);

    let (code, v) = post(
        url.clone(),
        json!({"model": "tiny", "messages": [{"role": "user", "content": "Weather in Paris?"}],
               "tools": http_tools(), "tool_choice": "required", "max_tokens": 120,
               "temperature": 0.8, "seed": 3}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64(),
        Some(ids.len() as u64),
        "the request ran on that prompt: {v}"
    );
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{v}");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    let city = args["city"].as_str().unwrap();
    assert!(city.chars().count() <= 12, "{args}");
    assert!(
        ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()),
        "{args}"
    );
    assert_eq!(args.as_object().unwrap().len(), 2, "closed object: {args}");

    // The follow-up turn: the template writes the call and the result in its own markup.
    let id = call["id"].as_str().unwrap().to_owned();
    let arguments = call["function"]["arguments"].as_str().unwrap().to_owned();
    let follow = vec![
        question[0].clone(),
        ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![ToolCall {
                id: id.clone(),
                name: "get_weather".into(),
                arguments: arguments.clone(),
            }],
            ..ChatMessage::default()
        },
        ChatMessage {
            role: "tool".into(),
            content: "18 C, clear".into(),
            tool_call_id: Some(id.clone()),
            ..ChatMessage::default()
        },
    ];
    let auto = Tools {
        choice: ToolChoice::Auto,
        ..tools()
    };
    let ids = model
        .prompt_tokens_for(
            &PromptInput::Chat(follow),
            &TemplateKwargs::new(),
            Some(&auto),
        )
        .unwrap();
    let prompt = model.tokenizer.decode(&ids).unwrap();
    assert!(
        prompt.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {")
            && prompt.contains("user\n<tool_response>\n18 C, clear\n</tool_response>"),
        "the call and its result in Qwen's markup: {prompt}"
    );
    let (code, v) = post(
        url,
        json!({"model": "tiny", "tools": http_tools(), "max_tokens": 16, "temperature": 0,
               "messages": [
                   {"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function",
                       "function": {"name": "get_weather", "arguments": arguments}}]},
                   {"role": "tool", "tool_call_id": id, "content": "18 C, clear"}]}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64(),
        Some(ids.len() as u64),
        "{v}"
    );
}
