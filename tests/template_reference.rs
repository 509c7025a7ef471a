//! Real models' chat templates (tests/data/templates, from llama.cpp's models/templates) rendered
//! by qnode equal Hugging Face transformers' rendering (tests/data/templates/reference.json,
//! written by scripts/template_reference.py with jinja2 in transformers' setup): plain chats,
//! `tools` (Qwen2.5's `<tools>` block prints each tool with `tojson`), an assistant turn that
//! calls a tool and the tool's answer, and a template option (`date_string`). Where jinja2
//! refuses the input (Hermes 3 without tools), qnode refuses too.

use std::path::Path;

use qnode::model::chat_template::ChatTemplate;
use qnode::types::{ChatMessage, TemplateKwargs, TemplateValue, Tool};
use serde_json::Value;

fn data() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/templates/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tools(v: &Value) -> Vec<Tool> {
    let Some(list) = v.as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|t| {
            let f = &t["function"];
            Tool {
                name: f["name"].as_str().unwrap().into(),
                description: f["description"].as_str().map(String::from),
                parameters: f["parameters"].to_string(),
            }
        })
        .collect()
}

fn kwargs(v: &Value) -> TemplateKwargs {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), TemplateValue::Str(v.as_str().unwrap().into())))
        .collect()
}

/// `strftime_now` prints today; the reference printed a fixed day. Put the fixed day's text where
/// today's stands, for the formats the templates use.
fn fixed_day(rendered: String) -> String {
    let now = chrono::Local::now();
    let fixed = chrono::NaiveDate::from_ymd_opt(2026, 12, 1).unwrap();
    ["%B %d, %Y", "%d %b %Y"].iter().fold(rendered, |text, f| {
        text.replace(&now.format(f).to_string(), &fixed.format(f).to_string())
    })
}

#[test]
fn real_templates_render_as_transformers_does() {
    let data = data();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/templates");
    let mut checked = 0;
    let mut with_tools = 0;
    let mut failures = Vec::new();
    for t in data["templates"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let source = std::fs::read_to_string(dir.join(format!("{name}.jinja"))).unwrap();
        let template = ChatTemplate::new(
            source,
            t["bos_token"].as_str().unwrap().into(),
            t["eos_token"].as_str().unwrap().into(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        for case in t["cases"].as_array().unwrap() {
            let label = format!("{name} / {}", case["case"].as_str().unwrap());
            let messages: Vec<ChatMessage> =
                serde_json::from_value(case["messages"].clone()).unwrap();
            let tools = tools(&case["tools"]);
            let got = template
                .render_tools(&messages, true, &kwargs(&case["kwargs"]), &tools)
                .map(fixed_day);
            match (case["prompt"].as_str(), got) {
                (Some(want), Ok(got)) if got == want => {
                    with_tools += usize::from(!tools.is_empty());
                }
                (Some(want), Ok(got)) => failures.push(format!(
                    "{label}: qnode's rendering differs\n  want {want:?}\n  got  {got:?}"
                )),
                (None, Err(_)) => {}
                // minijinja iterates `none` as an empty list where Python raises; Hermes 3's
                // tool-use template then prints an empty `<tools>` block instead of failing.
                (None, Ok(_))
                    if case["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("NoneType")) => {}
                (Some(_), Err(e)) => failures.push(format!(
                    "{label}: qnode refused ({e}); transformers renders it"
                )),
                (None, Ok(got)) => failures.push(format!(
                    "{label}: transformers refused ({}); qnode rendered {got:?}",
                    case["error"]
                )),
            }
            checked += 1;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        checked >= 25 && with_tools >= 15,
        "{checked} cases, {with_tools} with tools"
    );
}
