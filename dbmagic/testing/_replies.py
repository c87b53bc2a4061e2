"""The local workspace's answers, computed from the request alone: echoes, embeddings, a judge's
verdict, an answer that follows a schema, scripted tool calls, custom models' predictions."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
from typing import Any

from ._model import Endpoint, Fault


def echo_reply(prompt: str, *, system: str | None = None, stop: list[str] | None = None,
               max_tokens: int | None = None) -> tuple[str, str]:
    """The local workspace's deterministic answer: ``(text, finish_reason)``.

    ``Echo: <prompt>``, prefixed with ``[<system>] `` when a system prompt is given, cut at the
    first stop sequence, and cut to ``max_tokens`` words.
    """
    text = f"[{system}] Echo: {prompt}" if system else f"Echo: {prompt}"
    finish = "stop"
    for s in stop or []:
        if s and s in text:
            text = text[: text.index(s)]
    if max_tokens is not None:
        words = pieces_of(text)
        if len(words) > max_tokens:
            text, finish = "".join(words[:max_tokens]), "length"
    return text, finish


def pieces_of(text: str) -> list[str]:
    """Token-like pieces: each word with the white space before it (the last keeps what follows)."""
    return re.findall(r"\s*\S+(?:\s+$)?", text) or ([text] if text else [])


def tokens_asked(body: Any) -> int:
    """The input tokens of a request body, as the local workspace counts them (`pieces_of` every
    text it carries: messages, a prompt, inputs)."""
    if not isinstance(body, dict):
        return 0
    texts: list[str] = []
    for field in ("messages", "input"):
        value = body.get(field)
        items = value if isinstance(value, list) else [value] if value is not None else []
        for item in items:
            texts.append(text_of(item.get("content")) if isinstance(item, dict) else str(item))
    if "prompt" in body:
        texts.append(str(body["prompt"]))
    return sum(len(pieces_of(t)) for t in texts)


def embed(text: str, dim: int = 8) -> list[float]:
    digest = hashlib.sha256(str(text).encode()).digest()
    raw = [(b - 127.5) / 127.5 for b in digest[:dim]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


# the request and answer shape of each task
SHAPES = {"llm/v1/chat": "chat", "agent/v1/chat": "chat", "llm/v1/completions": "completions",
           "agent/v2/chat": "chat_agent", "agent/v1/responses": "responses"}


def nth_text(text: str, index: int) -> str:
    """Answer ``index`` of several (``n``): the first as it is, the others told apart (``... [2]``)."""
    return text if index == 0 or not text else f"{text} [{index + 1}]"


def nth(message: dict[str, Any], index: int) -> dict[str, Any]:
    return {**message, "content": nth_text(message["content"], index)} if isinstance(message.get("content"), str) \
        else message


def text_of(content: Any) -> str:
    """A message's content as text: a string, or a list of parts: their ``text``, and each image or
    file as what arrived (`what_arrived`), in order."""
    if isinstance(content, list):
        return "".join(what_arrived(p) if isinstance(p, dict) and p.get("type") not in (None, "text", "input_text")
                       else str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def what_arrived(part: dict[str, Any]) -> str:
    """An image or file part as the local workspace read it: ``[image/jpeg 800x600]``, ``[application/pdf,
    3 pages: first words]``, or ``[unreadable image/png]`` (chat's ``image_url`` and ``file`` parts, the
    Responses API's ``input_image`` and ``input_file``)."""
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if url is None:
        file = part.get("file") if isinstance(part.get("file"), dict) else part
        url = file.get("file_data")
    match = re.match(r"data:([\w/+.-]+);base64,(.*)$", str(url or ""), re.S)
    if match is None:
        return f"[{part.get('type')} without a data URL]"
    mime = match.group(1)
    try:
        data = base64.b64decode(match.group(2), validate=True)
        if mime == "application/pdf":
            import pypdfium2

            pdf = pypdfium2.PdfDocument(data)
            try:
                first = pdf[0].get_textpage().get_text_range().split() if len(pdf) else []
                return f"[{mime}, {len(pdf)} pages: {' '.join(first[:6])}]"
            finally:
                pdf.close()
        from PIL import Image

        with Image.open(io.BytesIO(data)) as picture:
            return f"[{Image.MIME.get(picture.format, mime)} {picture.size[0]}x{picture.size[1]}]"
    except Exception:  # what a model would refuse: said as such
        return f"[unreadable {mime}]"


def output_item(text: str) -> dict[str, Any]:
    return {"type": "message", "id": "msg_1", "role": "assistant", "content": [{"type": "output_text", "text": text}]}


def responses_usage(usage: dict[str, int]) -> dict[str, int]:
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"]}


# -- structured output and tools -------------------------------------------------------------------

def judge_reply(prompt: str) -> dict[str, str]:
    """The local judge's deterministic verdict on a `dbmagic.judge` prompt (its material: a JSON
    object with ``question``, ``input``, ``answer`` and maybe ``expected``), ``{"value": "yes"|"no",
    "rationale"}``: with a phrase in double quotes in the question, whether the answer contains that
    phrase; else, with an expected answer, whether the answer contains it; else whether there is an
    answer at all (case is ignored). It reads the material as JSON, as a model reads it: a part of
    the answer that looks like another part is text of the answer."""
    start = prompt.find("{")
    try:
        material, _ = json.JSONDecoder().raw_decode(prompt, start) if start >= 0 else ({}, 0)
    except ValueError:
        material = {}
    material = material if isinstance(material, dict) else {}
    answer, expected = str(material.get("answer") or ""), material.get("expected")
    question = str(material.get("question") or "")
    quoted = re.search(r'"([^"]+)"', question)
    wanted = quoted.group(1) if quoted else str(expected) if expected is not None else None
    if wanted is None:
        ok = bool(answer)
        return {"value": "yes" if ok else "no", "rationale": "There is an answer." if ok else "The answer is empty."}
    ok = wanted.casefold() in answer.casefold()
    return {"value": "yes" if ok else "no",
            "rationale": f"The answer {'contains' if ok else 'does not contain'} {wanted!r}."}


def schema_reply(schema: dict[str, Any], prompt: str) -> Any:
    """The local workspace's deterministic JSON answer that fits ``schema`` (a JSON Schema), made
    from ``prompt``: a string is the first phrase in double quotes of the prompt, or the prompt itself, an integer the number of words in it, a number
    that number / 10, a boolean whether it is even, a list the first three words (as the list's item
    type makes them), a choice (``enum``) the one at (number of words modulo the number of choices),
    an object every property filled so; where only null fits, null."""
    words = prompt.split()
    quoted = re.search(r'"([^"]+)"', prompt)
    phrase = quoted.group(1) if quoted else prompt
    root = schema

    def make(node: Any, depth: int = 0) -> Any:
        node = _followed(root, node)
        if depth > 12 or not isinstance(node, dict):
            return None
        if "const" in node:
            return node["const"]
        if node.get("enum"):
            choices = [c for c in node["enum"] if c is not None] or [None]
            return choices[len(words) % len(choices)]
        typed = node.get("type")
        if isinstance(typed, list):
            typed = next((t for t in typed if t != "null"), "null")
        if typed is None:
            for key in ("anyOf", "oneOf", "allOf"):
                options = [o for o in node.get(key) or () if _followed(root, o).get("type") != "null"]
                if options:
                    return make(options[0], depth + 1)
            typed = "object" if "properties" in node else "string"
        if typed == "object":
            return {name: make(sub, depth + 1) for name, sub in (node.get("properties") or {}).items()}
        if typed == "array":
            if depth > 3:  # a recursive schema (a tree) ends in empty lists, as a model's answer would
                return []
            items = node.get("items") or {"type": "string"}
            if _followed(root, items).get("type") == "string" and not _followed(root, items).get("enum"):
                return words[:3]
            return [make(items, depth + 1) for _ in words[:2]]
        if typed == "integer":
            return len(words)
        if typed == "number":
            return len(words) / 10
        if typed == "boolean":
            return len(words) % 2 == 0
        if typed == "null":
            return None
        return phrase

    return make(schema)


def _followed(root: Any, node: Any) -> dict[str, Any]:
    """``node`` with a local ``$ref`` followed (pydantic writes nested models so)."""
    for _ in range(16):
        if not (isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/")):
            break
        target = root
        for part in node["$ref"][2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        node = target
    return node if isinstance(node, dict) else {}


def question_of(turns: list[Any]) -> str:
    """The prompt a conversation asks about: the last user turn, or, when it asks again for an answer
    that did not fit a schema (dbmagic's retry), the question before it."""
    from dbmagic.call.schema import RETRY_NOTE

    users = [text_of(m.get("content")) for m in turns if isinstance(m, dict) and m.get("role") == "user"]
    asked = [u for u in users if not u.startswith(RETRY_NOTE)]
    return (asked or users or [""])[-1]


def _off_schema(value: Any) -> Any:
    """``value`` with its first field given a value of the wrong type (a model that did not follow)."""
    if isinstance(value, dict) and value:
        first = next(iter(value))
        wrong = {str: 12345, bool: "maybe", int: "many", float: "high", list: "not a list", dict: "not an object"}
        return {**value, first: wrong.get(type(value[first]), "unexpected")}
    return {"unexpected": value}


def _wanted_schema(shape: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema the request asks the answer to fit, or None; ValueError for a malformed one."""
    if shape == "responses":
        fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            return None
        holder, where = fmt, "text.format"
    else:
        fmt = body.get("response_format")
        if not isinstance(fmt, dict):
            return None
        if fmt.get("type") == "json_object":
            return {"type": "object", "properties": {"answer": {"type": "string"}}}
        if fmt.get("type") != "json_schema":
            raise ValueError(f"response_format.type must be json_schema or json_object; got {fmt.get('type')!r}.")
        holder, where = fmt.get("json_schema"), "response_format.json_schema"
        if not isinstance(holder, dict):
            raise ValueError("response_format.json_schema is required when the type is json_schema.")
    if not holder.get("name"):
        raise ValueError(f"{where}.name is required.")
    if not isinstance(holder.get("schema"), dict):
        raise ValueError(f"{where}.schema must be a JSON Schema object.")
    return holder["schema"]


def _instructed(prompt: str) -> tuple[str, dict[str, Any] | None]:
    """A prompt that carries dbmagic's schema instruction: ``(the prompt before it, the schema)``."""
    from dbmagic.call.schema import INSTRUCTION

    before, found, after = prompt.partition(INSTRUCTION)
    if not found:
        return prompt, None
    try:
        schema, _ = json.JSONDecoder().raw_decode(after.lstrip())
    except ValueError:
        return prompt, None
    return before.strip(), schema if isinstance(schema, dict) else None


def _json_text(value: Any, fenced: bool) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return f"Here is the JSON you asked for:\n```json\n{text}\n```" if fenced else text


def reply_text(prompt: str, *, system: str | None = None, stop: list[str] | None = None,
                max_tokens: int | None = None, fault: Fault | None = None) -> tuple[str, str]:
    """What a model that follows instructions answers a plain prompt: JSON (fenced, as such models
    write it) when the prompt carries dbmagic's schema instruction, else `echo_reply`."""
    before, schema = _instructed(prompt)
    if schema is None:
        return echo_reply(prompt, system=system, stop=stop, max_tokens=max_tokens)
    value = schema_reply(schema, before)
    return _json_text(_off_schema(value) if fault is not None and fault.off_schema else value, True), "stop"


def reply_to(endpoint: Endpoint, body: dict[str, Any], shape: str, turns: list[Any], prompt: str,
           system: str | None, fault: Fault | None) -> dict[str, Any]:
    """The answer to a chat, agent or completions request: text, finish reason and tool calls."""
    if fault is not None and fault.text is not None:
        return {"text": fault.text, "finish": "stop"}
    tools = body.get("tools") if shape in ("chat", "responses") else None
    if tools and body.get("tool_choice") != "none":
        results = _tool_results(shape, turns)
        if not results or endpoint.tool_loop:
            if fault is not None and fault.tool_call:
                wanted = fault.tool_call
                call = {"name": str(wanted.get("name")), "arguments": json.dumps(wanted.get("arguments", {}))}
            else:
                call = _scripted_call(tools, shape, prompt)
            number = sum(1 for _ in results) + 1
            call["id"] = f"call_{number}_{hashlib.md5(prompt.encode()).hexdigest()[:8]}"
            return {"text": "", "finish": "tool_calls", "tool_calls": [call]}
        return {"text": f"Echo: {prompt}" + "".join(f" | {name} -> {content}" for name, content in results),
                "finish": "stop"}
    schema = _wanted_schema(shape, body) if shape in ("chat", "responses") else None
    if endpoint.judge:
        return {"text": _json_text(judge_reply(prompt), schema is None and endpoint.json_style == "fenced"),
                "finish": "stop"}
    if schema is not None:
        value = schema_reply(schema, prompt)
        return {"text": _json_text(_off_schema(value) if fault is not None and fault.off_schema else value,
                                   endpoint.json_style == "fenced"), "finish": "stop"}
    text, finish = reply_text(prompt, system=system, stop=body.get("stop"), max_tokens=body.get("max_tokens"),
                               fault=fault)
    return {"text": text, "finish": finish}


def _tool_definition(tool: Any, shape: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise ValueError("Each tool must be {\"type\": \"function\", ...}.")
    definition = tool if shape == "responses" else tool.get("function")
    if not isinstance(definition, dict) or not isinstance(definition.get("name"), str):
        where = "tools[i].name" if shape == "responses" else "tools[i].function.name"
        raise ValueError(f"{where} is required.")
    return definition


def _scripted_call(tools: list[Any], shape: str, prompt: str) -> dict[str, Any]:
    definitions = [_tool_definition(t, shape) for t in tools]
    chosen = next((d for d in definitions if d["name"] in prompt), definitions[0])
    parameters = chosen.get("parameters") or {"type": "object", "properties": {}}
    arguments = schema_reply(parameters, prompt)  # a model leaves out the parameters that have defaults
    required = parameters.get("required")
    if isinstance(arguments, dict) and isinstance(required, list):
        arguments = {k: v for k, v in arguments.items() if k in required}
    return {"name": chosen["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}


def _tool_results(shape: str, turns: list[Any]) -> list[tuple[str, str]]:
    """``(tool name, result)`` of each tool result after the last user turn."""
    last_user = max((i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("role") == "user"), default=-1)
    names: dict[str, str] = {}
    results = []
    for turn in turns[last_user + 1:]:
        if not isinstance(turn, dict):
            continue
        if shape == "responses":
            if turn.get("type") == "function_call":
                names[str(turn.get("call_id"))] = str(turn.get("name"))
            elif turn.get("type") == "function_call_output":
                results.append((names.get(str(turn.get("call_id")), "?"), text_of(turn.get("output"))))
        else:
            for call in turn.get("tool_calls") or ():
                if isinstance(call, dict):
                    names[str(call.get("id"))] = str((call.get("function") or {}).get("name"))
            if turn.get("role") == "tool":
                results.append((names.get(str(turn.get("tool_call_id")), "?"), text_of(turn.get("content"))))
    return results


def refused_by_quirks(endpoint: Endpoint, body: dict[str, Any], shape: str, turns: list[Any]) -> str | None:
    """What Databricks refuses that the OpenAI API takes (the quirks databricks_openai works around)."""
    model = endpoint.model.lower()
    for i, tool in enumerate(body.get("tools") or () if shape in ("chat", "responses") else ()):
        definition = tool.get("function") if shape == "chat" and isinstance(tool, dict) else tool
        if isinstance(definition, dict) and "strict" in definition and "gpt" not in model:
            return f"tools[{i}]: 'strict' is not supported by {endpoint.model}."
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            continue
        empty = turn.get("content") in (None, "", [])  # a space is what databricks_openai sends, and is taken
        if "claude" in model and turn.get("role") == "assistant" and turn.get("tool_calls") and empty:
            return f"messages[{i}]: an assistant message with tool calls must have non-empty content."
        if shape == "responses" and isinstance(turn.get("id"), str) and len(turn["id"]) > 64:
            return f"input[{i}].id: string too long, at most 64 characters (got {len(turn['id'])})."
    return None


def chat_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    return {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


def function_call_item(call: dict[str, Any]) -> dict[str, Any]:
    # the Foundation Model APIs' item ids are longer than the 64 characters they take back as input
    item_id = "fc_" + hashlib.sha256(call["id"].encode()).hexdigest()[:67]
    return {"type": "function_call", "id": item_id, "call_id": call["id"], "name": call["name"],
            "arguments": call["arguments"], "status": "completed"}


def records_of(body: dict[str, Any]) -> list[Any] | None:
    if "dataframe_records" in body:
        return list(body["dataframe_records"])
    if "dataframe_split" in body:
        split = body["dataframe_split"]
        return [dict(zip(split.get("columns", []), row, strict=False)) for row in split.get("data", [])]
    if "instances" in body:
        return list(body["instances"])
    if "inputs" in body:
        inputs = body["inputs"]
        return list(inputs) if isinstance(inputs, list) else [inputs]
    return None


def echo_predictions(records: list[Any]) -> list[Any]:
    out = []
    for record in records:
        if isinstance(record, dict) and "prompt" in record:
            out.append(reply_text(str(record["prompt"]), stop=record.get("stop"))[0])
        else:
            out.append(record)
    return out
