"""Images and documents in prompts (issue 35), over real HTTP: what the local workspace received
(the decoded pictures, their sizes, the order of text and parts), sizes fitted for the 4 MB limit,
a bad file failing its row alone, kinds that take text only refused before sending."""

from __future__ import annotations

import base64
import io
import json

import pytest

PIL = pytest.importorskip("PIL")
pytest.importorskip("pypdfium2")

from PIL import Image  # noqa: E402

import dbmagic  # noqa: E402
from dbmagic import Client, ConfigurationError  # noqa: E402
from dbmagic.prompts.attachments import AttachmentError  # noqa: E402
from dbmagic.prompts.templating import Template  # noqa: E402
from dbmagic.testing import text_pdf  # noqa: E402

from .conftest import CHAT, CUSTOM, EMBEDDINGS  # noqa: E402

RESPONSES = "local-responses-agent"


def picture(width: int, height: int, fmt: str = "PNG", noise: bool = False) -> bytes:
    """An image's bytes: a plain colour, or noise (which compresses badly: a large file)."""
    if noise:
        import os

        img = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    else:
        img = Image.new("RGB", (width, height), (200, 40, 40))
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def invocations(ws, name):
    return [r for r in ws.requests if r.path == f"/serving-endpoints/{name}/invocations"]


def received_images(request) -> list[tuple[str, tuple[int, int]]]:
    """(format, size) of every image a request carried, decoded as the server got it."""
    found = []
    for turn in request.json.get("messages") or request.json.get("input") or []:
        for part in turn["content"] if isinstance(turn.get("content"), list) else []:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if url:
                head, data = url.split(",", 1)
                with Image.open(io.BytesIO(base64.b64decode(data))) as img:
                    found.append((head, img.size))
    return found


@pytest.fixture
def client(workspace):
    c = Client(host=workspace.host, token=workspace.token)
    yield c
    c.close()


def test_an_image_goes_where_it_stands_in_the_prompt(workspace, client, tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(picture(640, 480))
    for given in (picture(640, 480), str(path), Image.new("RGB", (640, 480), (1, 2, 3))):
        answer = dbmagic.batch("Before {{ image(x) }} between {{ image(x) }} after", [{"x": given}], CHAT,
                               client=client, progress=False)
        assert answer.texts == ["Echo: Before [image/png 640x480] between [image/png 640x480] after"] or \
            answer.texts == ["Echo: Before [image/jpeg 640x480] between [image/jpeg 640x480] after"]
    sent = invocations(workspace, CHAT)[0].json["messages"][-1]["content"]
    assert [p["type"] for p in sent] == ["text", "image_url", "text", "image_url", "text"]
    assert sent[0]["text"] == "Before " and sent[4]["text"] == " after"
    assert sent[1]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(picture(640, 480)).decode()


def test_a_large_image_is_brought_under_the_limit(workspace, client):
    big = picture(4000, 3000, noise=True)  # about 36 MB as PNG
    assert len(big) > 4_000_000
    answer = client.complete(Template("{{ image(big) }} what is it?").render({"big": big}),
                             endpoint=CHAT)
    request = invocations(workspace, CHAT)[-1]
    assert received_images(request) == [("data:image/jpeg;base64", (1568, 1176))]
    assert len(json.dumps(request.json)) < 4_000_000 and answer.text == "Echo: [image/jpeg 1568x1176] what is it?"


def test_a_phones_photo_is_sent_the_right_way_up(workspace, client):
    """A camera's JPEG says its orientation in EXIF, and re-encoding drops EXIF: the pixels are turned
    first (else a portrait arrived on its side)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    for size, sent in (((4000, 3000), (1176, 1568)), ((800, 600), (600, 800))):  # a small one is not sent as is
        out = io.BytesIO()
        Image.new("RGB", size, (10, 200, 10)).save(out, "JPEG", exif=exif.tobytes())
        client.complete(Template("{{ image(photo) }}").render({"photo": out.getvalue()}), endpoint=CHAT)
        assert received_images(invocations(workspace, CHAT)[-1]) == [("data:image/jpeg;base64", sent)]


def test_a_corrupt_image_fails_its_row_alone_before_sending(workspace, client, tmp_path):
    secret = tmp_path / "notes.txt"
    secret.write_text("password=hunter2")
    rows = [{"pic": picture(64, 64)}, {"pic": b"\x89PNG not really"}, {"pic": str(secret)}, {"pic": picture(32, 32)}]
    result = dbmagic.batch("{{ image(pic) }}", rows, CHAT, client=client, progress=False)
    assert result.texts[0] == "Echo: [image/png 64x64]" and result.texts[3] == "Echo: [image/png 32x32]"
    assert result.failed == [1, 2] and "is not an image Pillow can read" in result.errors[1]
    assert "hunter2" not in result.errors[2] and "notes.txt is not an image" in result.errors[2]
    assert len(invocations(workspace, CHAT)) == 2  # only the good rows reached the server


def test_a_path_that_is_not_a_regular_file_fails_its_row_without_blocking(workspace, client, tmp_path):
    """A path column of a shared table may name a FIFO (its open would wait for a writer forever) or
    a folder: each fails its row, unread, and the others are answered."""
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    rows = [{"pic": str(fifo)}, {"pic": str(tmp_path)}, {"pic": picture(16, 16)}]
    result = dbmagic.batch("{{ image(pic) }}", rows, CHAT, client=client, progress=False)
    assert result.failed == [0, 1] and all("is not one" in result.errors[i] for i in (0, 1))
    assert result.texts[2] == "Echo: [image/png 16x16]" and len(invocations(workspace, CHAT)) == 1


def test_nothing_is_fetched_from_a_url(workspace, client):
    with pytest.raises(AttachmentError, match="does not fetch URLs"):
        client.complete(Template("{{ image(u) }}").render(
            {"u": "http://127.0.0.1:1/x.png"}), endpoint=CHAT)
    assert invocations(workspace, CHAT) == []


def test_kinds_that_take_text_only_are_refused_before_sending(workspace, client):
    parts = Template("{{ image(p) }}").render({"p": picture(8, 8)})
    for endpoint, kind in ((EMBEDDINGS, "embeddings"), (CUSTOM, "custom"), ("local-completions", "completions")):
        with pytest.raises(ConfigurationError, match=f"takes {kind} requests, which carry text only"):
            client.complete(parts, endpoint=endpoint)
    assert not [r for r in workspace.requests if r.path.endswith("/invocations")]


def test_the_responses_api_gets_input_image_parts(workspace, client):
    parts = Template("Look {{ image(p) }}").render({"p": picture(20, 10)})
    answer = client.complete(parts, endpoint=RESPONSES)
    sent = invocations(workspace, RESPONSES)[-1].json["input"][-1]["content"]
    assert [p["type"] for p in sent] == ["input_text", "input_image"]
    assert sent[1]["image_url"].startswith("data:image/png;base64,") and "[image/png 20x10]" in answer.text


def test_a_pdf_as_its_pages_its_text_or_the_file(workspace, client):
    pdf = text_pdf([["Invoice 42", "Total: 12.50 EUR"], ["Thank you"], ["Terms"]])
    render = Template
    as_images = client.complete(render("{{ document(d, pages='1-2') }}").render({"d": pdf}), endpoint=CHAT)
    assert [size for _, size in received_images(invocations(workspace, CHAT)[-1])] == [(1109, 1568), (1109, 1568)]
    assert as_images.text == "Echo: [image/jpeg 1109x1568][image/jpeg 1109x1568]"
    as_text = client.complete(render("Read: {{ document(d, as_='text', pages=1) }}").render({"d": pdf}), endpoint=CHAT)
    assert as_text.text == "Echo: Read: Invoice 42\r\nTotal: 12.50 EUR"
    as_file = client.complete(render("{{ document(d, as_='file') }}").render({"d": pdf}), endpoint=CHAT)
    assert as_file.text == "Echo: [application/pdf, 3 pages: Invoice 42 Total: 12.50 EUR]"
    with pytest.raises(AttachmentError, match="has 3 pages; there is no page 5"):
        render("{{ document(d, pages=5) }}").render({"d": pdf})
    scan = io.BytesIO()
    Image.new("RGB", (300, 400), (255, 255, 255)).save(scan, "PDF")
    with pytest.raises(AttachmentError, match="no text layer"):
        render("{{ document(d, as_='text') }}").render({"d": scan.getvalue()})


def test_a_request_over_4_mb_fails_before_sending_and_the_server_refuses_one(workspace, client):
    many = {f"p{i}": picture(1500, 1500, "JPEG", noise=True) for i in range(4)}
    template = Template(" ".join(f"{{{{ image(p{i}, quality=95) }}}}" for i in range(4)))
    with pytest.raises(AttachmentError, match=r"over Databricks' 4 MB request limit. Send fewer or smaller images"):
        client.complete(template.render(many), endpoint=CHAT)
    assert invocations(workspace, CHAT) == []
    import requests

    body = json.dumps({"messages": [{"role": "user", "content": "x" * 4_300_000}]})
    refused = requests.post(f"{workspace.host}/serving-endpoints/{CHAT}/invocations", data=body,
                            headers={"Authorization": f"Bearer {workspace.token}"}, timeout=10)
    assert refused.status_code == 400 and "exceeds the limit of 4 MB" in refused.json()["message"]


def test_two_different_images_are_never_one_cache_entry(workspace, client, tmp_path):
    dbmagic.use_cache(str(tmp_path / "cache"))
    try:
        template = Template("What colour? {{ image(p) }}")
        red, blue = picture(16, 16), io.BytesIO()
        Image.new("RGB", (16, 16), (0, 0, 200)).save(blue, "PNG")
        first = client.complete(template.render({"p": red}), endpoint=CHAT, temperature=0)
        second = client.complete(template.render({"p": blue.getvalue()}), endpoint=CHAT, temperature=0)
        again = client.complete(template.render({"p": red}), endpoint=CHAT, temperature=0)
    finally:
        dbmagic.use_cache(None)
    assert not first.cached and not second.cached and again.cached
    assert len(invocations(workspace, CHAT)) == 2


def test_attach_adds_pictures_and_documents_after_the_cell(shell, workspace, tmp_path):
    path = tmp_path / "scan.pdf"
    Image.new("RGB", (300, 400), (255, 255, 255)).save(path, "PDF")
    shell.user_ns["photo"] = picture(50, 40)
    shell.run_cell_magic("dbllm", f"-e {CHAT} --attach photo --attach {path} --no-stream", "What are these?")
    assert shell.user_ns["_dbllm"].text == "Echo: What are these?\n[image/png 50x40][image/jpeg 834x1112]"  # the page at 200 dpi
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="--attach nothere: it is neither a variable of the notebook nor a file"):
        shell.run_cell_magic("dbllm", f"-e {CHAT} --attach nothere", "What?")


def test_the_cell_shows_what_was_sent_and_a_dry_run_says_what_it_would_send(shell, workspace, capsys):
    shell.user_ns["photo"] = picture(300, 150)
    shell.run_cell_magic("dbllm", f"-e {CHAT} --no-stream", "Describe {{ image(photo) }}")
    shown = shell.display_pub.outputs[-1]["data"]
    assert shown["text/markdown"].startswith("![sent](data:image/jpeg;base64,")
    assert "*Sent: 1 image (image/png 300x150)*" in shown["text/markdown"]
    assert shown["text/plain"] == "Sent: 1 image (image/png 300x150)\nEcho: Describe [image/png 300x150]"
    thumb = shown["text/markdown"].split("(", 1)[1].split(")", 1)[0]
    with Image.open(io.BytesIO(base64.b64decode(thumb.partition(",")[2]))) as small:
        assert small.size == (96, 48)  # a thumbnail, not the picture sent
    shell.run_cell_magic("dbllm", f"-e {CHAT} --dry-run", "Describe {{ image(photo) }}")
    request = shell.display_pub.outputs[-1]["data"]["text/plain"]
    assert "data:image/png;base64,... (" in request and "300x150, about 60 input tokens)" in request
    assert len(request) < 2000  # the picture is described, not printed
    shell.user_ns["rows"] = [{"p": picture(750, 100)}, {"p": picture(750, 200)}]
    shell.run_cell_magic("dbllm", f"-e {CHAT} --over rows --dry-run", "{{ image(p) }}")
    assert "about 300 input tokens" in capsys.readouterr().out  # 100 and 200 for the images, no text
    before = len(invocations(workspace, CHAT))
    shell.run_cell_magic("dbllm", f"-e {CHAT} --over rows", "{{ image(p) }}")
    assert "2 answered" in capsys.readouterr().out and len(invocations(workspace, CHAT)) == before + 2
    assert shell.user_ns["_dbllm"].attachments == 2 and "2 images or files in the rows' requests" in \
        shell.user_ns["_dbllm"].summary()


def test_a_checkpoint_knows_each_picture_by_its_bytes(workspace, client, tmp_path):
    rows = [{"p": picture(10, 10)}, {"p": picture(11, 10)}, {"p": picture(10, 10)}]
    first = dbmagic.batch("{{ image(p) }}", rows, CHAT, client=client, progress=False,
                          checkpoint=str(tmp_path / "ck"))
    assert first.texts == ["Echo: [image/png 10x10]", "Echo: [image/png 11x10]", "Echo: [image/png 10x10]"]
    assert len(invocations(workspace, CHAT)) == 2  # the same picture twice is one request
    rows.append({"p": picture(12, 10)})
    again = dbmagic.batch("{{ image(p) }}", rows, CHAT, client=client, progress=False,
                          checkpoint=str(tmp_path / "ck"))
    assert again.from_checkpoint == 3 and again.texts[3] == "Echo: [image/png 12x10]"
    assert len(invocations(workspace, CHAT)) == 3


def test_a_comparison_shows_what_every_column_was_sent(shell, workspace):
    shell.user_ns["photo"] = picture(200, 100)
    shell.run_cell_magic("dbllm", f"-e {CHAT} -e {RESPONSES}", "What is it? {{ image(photo) }}")
    shown = shell.display_pub.outputs[-1]["data"]
    assert shown["text/html"].startswith("<div class='dbmagic-sent'><img src='data:image/jpeg;base64,")
    assert shown["text/html"].count("<img") == 1 and "Sent: 1 image (image/png 200x100)" in shown["text/html"]
    assert shown["text/plain"].startswith("Sent: 1 image (image/png 200x100)")
    assert shown["text/html"].count("Echo: What is it? [image/png 200x100]") == 2


def test_a_custom_model_takes_pictures_through_transform_input(workspace, client):
    from dbmagic.prompts.attachments import Attachment

    def as_records(**request):  # the parts: text, and Attachment (mime, data, data_url())
        parts = request.pop("prompt")
        text = "".join(p for p in parts if isinstance(p, str))
        pictures = [base64.b64encode(p.data).decode() for p in parts if isinstance(p, Attachment)]
        return {"dataframe_records": [{"prompt": text, "image": pictures[0]}]}

    parts = Template("Count the cats {{ image(p) }}").render({"p": picture(9, 9)})
    client.complete(parts, endpoint=CUSTOM, transform_input=as_records)
    [record] = invocations(workspace, CUSTOM)[-1].json["dataframe_records"]
    assert record["prompt"] == "Count the cats " and base64.b64decode(record["image"]) == picture(9, 9)


def test_a_registry_prompt_cannot_attach_a_file(tmp_path):
    """A registry prompt is someone else's text: image() and document() are the cell's own, never its."""
    from dbmagic.prompts.templating import RegistryTemplate

    secret = tmp_path / "id_rsa.png"
    secret.write_bytes(picture(4, 4))
    template = RegistryTemplate("{% if 1 %}Look {{ image('" + str(secret) + "') }}{% endif %}", "prompts:/look/1")
    with pytest.raises(dbmagic.TemplateError, match="image"):
        template.render({})


def test_a_picture_lost_in_a_filter_is_an_error_not_garbage():
    with pytest.raises(AttachmentError, match="must stand on their own"):
        Template("{{ image(p) | upper }}").render({"p": picture(4, 4)})
    parts = Template("{% for p in ps %}[{{ image(p) }}]{% endfor %}").render({"ps": [picture(4, 4), picture(5, 4)]})
    assert [x if isinstance(x, str) else x.width for x in parts] == ["[", 4, "][", 5, "]"]
