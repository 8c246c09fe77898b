"""The REST API on tiny models: FastAPI's TestClient in-process, and one real uvicorn server over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from embfactor.cli.main import main  # noqa: E402
from embfactor.models import LoadedModel, load_model  # noqa: E402
from embfactor.server import Limits, create_app, generate_text  # noqa: E402
from embfactor.surgery import factorize_  # noqa: E402

from .conftest import D, VOCAB  # noqa: E402

WORDS = ["<pad>", "<unk>", "<eos>", "the", "cat", "dog", "sat", "on", "mat", "a", "is", "good", "bad"]


def word_tokenizer():
    """A whitespace word-level PreTrainedTokenizerFast over VOCAB tokens, with an EOS token (no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS + [f"w{i}" for i in range(VOCAB - len(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def encoder_lm(tmp_path_factory) -> LoadedModel:
    """A tiny BERT folder (as conftest's tiny_bert_dir) compressed by the CLI at rank 8; built once per module."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("server")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(cfg).save_pretrained(root / "bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS[3:]]
    vocab += [f"w{i}" for i in range(VOCAB - len(vocab))]
    (root / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(root / "bert" / "vocab.txt")).save_pretrained(root / "bert")
    assert main(["compress", str(root / "bert"), "--rank", "8", "--output", str(root / "enc-r8"), "-q",
                 "--json", str(root / "enc-r8.json")]) == 0
    return load_model(root / "enc-r8")


@pytest.fixture(scope="module")
def decoder_lm() -> LoadedModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=2, n_positions=64)).eval()
    factorize_(model, rank=8, method="svd")
    return LoadedModel("tiny-gpt2", model, word_tokenizer(), "decoder", Path("tiny-gpt2"), compressed=False)


@pytest.fixture(scope="module")
def enc(encoder_lm):
    return TestClient(create_app(encoder_lm, Limits(max_texts=4, max_tokens=16)))


@pytest.fixture(scope="module")
def dec(decoder_lm):
    return TestClient(create_app(decoder_lm, Limits(max_texts=4, max_tokens=16, max_new_tokens=8)))


def test_health_info_and_docs(enc, encoder_lm):
    assert enc.get("/health").json() == {"status": "ok", "kind": "encoder"}
    info = enc.get("/info").json()
    assert info["compressed"] is True and info["rank"] == 8 and info["method"] == "svd"
    assert (info["vocab_size"], info["hidden_size"], info["tied_head"]) == (VOCAB, D, False)
    assert info["embedding_params_before"] == VOCAB * 32
    assert info["embedding_params_after"] == 8 * (VOCAB + 32)
    assert info["params_before"] - info["params_after"] == VOCAB * 32 - 8 * (VOCAB + 32)
    assert info["bytes_after"] == (encoder_lm.source / "model.safetensors").stat().st_size
    assert info["bytes_after"] < info["bytes_before"]
    # /info and compress --json state the same sizes (they disagreed by the source file's safetensors header)
    report = json.loads(encoder_lm.source.with_suffix(".json").read_text())
    source_file = encoder_lm.source.parent / "bert" / "model.safetensors"
    assert info["bytes_before"] == report["bytes_before"] == source_file.stat().st_size
    assert info["bytes_after"] == report["bytes_after"]
    assert enc.get("/docs").status_code == 200
    assert "/embed" in enc.get("/openapi.json").json()["paths"]



def test_docs_are_served_offline(enc):
    """/docs and /redoc reference only assets this server serves itself (FastAPI's default is a CDN)."""
    import re

    for page, kinds in (("/docs", {".js": "javascript", ".css": "text/css"}), ("/redoc", {".js": "javascript"})):
        r = enc.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "http://" not in r.text and "https://" not in r.text and "cdn" not in r.text.lower()
        urls = re.findall(r'(?:src|href)="([^"]+)"', r.text)
        for ext, ctype in kinds.items():
            (url,) = [u for u in urls if u.endswith(ext)]
            assert url.startswith("/docs-assets/")
            asset = enc.get(url)
            assert asset.status_code == 200 and ctype in asset.headers["content-type"]
            assert len(asset.content) > 10_000  # the real bundle, not an error page
        for url in urls:
            assert enc.get(url).status_code == 200, url
    assert "SwaggerUIBundle" in enc.get("/docs-assets/swagger-ui-bundle.js").text
    assert "/docs" not in enc.get("/openapi.json").json()["paths"]  # the docs pages stay out of the schema
    assert enc.get("/docs/oauth2-redirect").status_code == 200
    assert enc.get("/docs-assets/missing.js").status_code == 404

def test_embed_matches_library(enc, encoder_lm):
    from embfactor.eval.embed import sentence_embeddings

    texts = ["the cat sat", "a dog is good", "bad movie"]
    r = enc.post("/embed", json={"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == D and len(body["embeddings"]) == 3 and body["tokens"] == [5, 6, 4]  # [CLS] .. [SEP]
    got = torch.tensor(body["embeddings"])
    want = sentence_embeddings(encoder_lm.model, encoder_lm.tokenizer, texts)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(3), atol=1e-5)
    raw = torch.tensor(enc.post("/embed", json={"texts": texts, "normalize": False}).json()["embeddings"])
    assert not torch.allclose(raw.norm(dim=1), torch.ones(3), atol=1e-3)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=1), got, atol=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"texts": []}, 422, "at least 1 item"),
        ({"texts": "the cat"}, 422, "valid list"),
        ({"texts": [1, 2]}, 422, "valid string"),
        ({"texts": ["a", "b", "c", "d", "e"]}, 413, "too many texts: 5 > max_texts=4"),
        ({"texts": ["the " * 40]}, 413, "more than max_tokens=16 tokens"),
        ({"texts": ["   "]}, 422, "blank"),
        ({"texts": [""]}, 422, "blank"),
        ({"texts": ["a"], "normalize": "yes"}, 422, "valid boolean"),
        ({"texts": ["a"], "pool": "cls"}, 422, "Extra inputs are not permitted"),
        ({}, 422, "Field required"),
    ],
)
def test_embed_bad_requests(enc, body, status, message):
    r = enc.post("/embed", json=body)
    assert r.status_code == status, r.text
    assert message in r.text


def test_malformed_bodies_are_4xx(enc, dec):
    assert enc.post("/embed", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert enc.post("/embed", json=["a list"]).status_code == 422
    assert enc.post("/embed", content=b"\xff\xfe", headers={"content-type": "application/json"}).status_code == 422
    headers = {"content-type": "application/json", "content-length": "9999999"}
    big = enc.post("/embed", content=b"x" * 10, headers=headers)
    assert big.status_code == 413 and "max_body_bytes" in big.text
    assert enc.get("/embed").status_code == 405
    assert enc.post("/nope", json={}).status_code == 404


SCHEMA_MESSAGES = ("less than or equal to", "greater than or equal to", "valid string")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"texts": [NaN]}', "NaN is not a JSON value"),
        (b'{"texts": ["\\ud800"]}', "body.texts[0] contains a lone UTF-16 surrogate (\\ud800"),
        (b'{"texts": ["ok", "a\\udc00b"]}', "body.texts[1] contains a lone UTF-16 surrogate (\\udc00 at character 1)"),
        (b'{"prompt": "\\udfff"}', "body.prompt contains a lone UTF-16 surrogate"),
        (b'{"texts": ["a"], "normalize": Infinity}', "Infinity is not a JSON value"),
        (b'{"prompt": "the", "temperature": -Infinity}', "-Infinity is not a JSON value"),
        (b'{"prompt": "the", "seed": 1e400}', "1e400 is too large for a 64-bit float"),
        (b'{"prompt": "the", "max_new_tokens": 1' + b"0" * 5000 + b"}", "integer of more than 4,300 digits"),
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        (b'{"texts": [{"\\ud800": 1}]}', "a key of body.texts[0] contains a lone UTF-16 surrogate"),
        (b'{"texts": ["a"]} trailing', "JSON decode error"),
        (b'{"texts": ["a"', "JSON decode error"),
        (b"\xff\xfe\xfd", ""),
        (b'{"prompt": "the", "seed": 99999999999999999999999999}', "less than or equal to 18446744073709551615"),
        (b'{"prompt": "the", "seed": -1}', "greater than or equal to 0"),
        (b"null", "valid dictionary"),
        (b'"texts"', "valid dictionary"),
        (b"", "Field required"),
        (b'{"texts": [null]}', "valid string"),
        (b'{"texts": [["nested"]]}', "valid string"),
        (b'{"texts": ["a"], "texts": {"b": NaN}}', "NaN is not a JSON value"),
    ],
)
def test_malformed_json_is_4xx_never_500(enc, dec, body, message):
    """What Python's json module accepts but JSON does not (NaN, Infinity, 1e400, lone surrogates), and other junk:
    every endpoint answers 4xx with a message (these were 500s: the error could not be rendered, or the tokenizer
    failed on the surrogate)."""
    headers = {"content-type": "application/json"}
    for client, path in ((enc, "/embed"), (dec, "/generate"), (dec, "/score")):
        r = client.post(path, content=body, headers=headers)
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        detail = r.json()["detail"]
        # refused while parsing: the same message everywhere; a schema error names the endpoint's own fields
        if any(m in message for m in SCHEMA_MESSAGES) and (path == "/generate") != (b'"prompt"' in body):
            continue
        assert message in (detail if isinstance(detail, str) else r.text), (path, r.text)


def test_valid_surrogate_pairs_and_odd_characters_are_served(enc):
    """Escaped surrogate *pairs* are ordinary characters (an emoji), NUL and U+FFFF are text: 200, not refused."""
    headers = {"content-type": "application/json"}
    r = enc.post("/embed", content=b'{"texts": ["the cat \\ud83d\\ude00", "a\\u0000b", "\\uffff dog"]}', headers=headers)
    assert r.status_code == 200, r.text
    assert len(r.json()["embeddings"]) == 3


def test_wrong_kind_is_400(enc, dec):
    r = enc.post("/generate", json={"prompt": "the cat"})
    assert r.status_code == 400 and "needs a decoder model" in r.json()["detail"]
    assert enc.post("/score", json={"texts": ["the cat"]}).status_code == 400
    r = dec.post("/embed", json={"texts": ["the cat"]})
    assert r.status_code == 400 and "needs an encoder model" in r.json()["detail"]


def test_generate_greedy_matches_hf_generate(dec, decoder_lm):
    r = dec.post("/generate", json={"prompt": "the cat sat on", "max_new_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompt_tokens"] == 4 and body["finish_reason"] in ("length", "eos")
    ids = torch.tensor([decoder_lm.tokenizer("the cat sat on")["input_ids"]])
    ref = decoder_lm.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
    assert body["text"] == decoder_lm.tokenizer.decode(ref[0, 4:], skip_special_tokens=True)
    assert dec.post("/generate", json={"prompt": "the cat sat on", "max_new_tokens": 6}).json() == body


def test_generate_sampling_is_seeded(dec):
    req = {"prompt": "a dog", "max_new_tokens": 8, "temperature": 1.5, "seed": 7}
    a, b = dec.post("/generate", json=req).json(), dec.post("/generate", json=req).json()
    assert a == b
    texts = {dec.post("/generate", json={**req, "seed": s}).json()["text"] for s in range(6)}
    assert len(texts) > 1


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"prompt": "the", "max_new_tokens": 9}, 422, "above the server's cap of 8"),
        ({"prompt": "the", "max_new_tokens": 0}, 422, "greater than or equal to 1"),
        ({"prompt": "the", "max_new_tokens": "3"}, 422, "valid integer"),
        ({"prompt": "the", "max_new_tokens": 2.5}, 422, "valid integer"),
        ({"prompt": "the", "temperature": -1}, 422, "greater than or equal to 0"),
        ({"prompt": "the", "temperature": 99}, 422, "temperature must be in [0, 5.0]"),
        ({"prompt": ""}, 422, "at least 1 character"),
        ({"prompt": ["the"]}, 422, "valid string"),
        ({"prompt": "the " * 20}, 413, "more than max_tokens=16 tokens"),
    ],
)
def test_generate_bad_requests(dec, body, status, message):
    r = dec.post("/generate", json=body)
    assert r.status_code == status, r.text
    assert message in r.text


def test_prompt_plus_new_tokens_over_positions(decoder_lm):
    client = TestClient(create_app(decoder_lm, Limits(max_tokens=256, max_new_tokens=128)))
    r = client.post("/generate", json={"prompt": "the " * 60, "max_new_tokens": 10})
    assert r.status_code == 413 and "64 positions" in r.json()["detail"]


def test_score_perplexity_known_answer(dec, decoder_lm):
    texts = ["the cat sat on the mat", "a dog is good"]
    r = dec.post("/score", json={"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    for text, s in zip(texts, body["scores"]):
        ids = torch.tensor([decoder_lm.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            loss = decoder_lm.model(input_ids=ids, labels=ids).loss  # HF's own shifted cross-entropy
        assert s["tokens"] == ids.shape[1] - 1
        assert s["nll"] == pytest.approx(float(loss), rel=1e-5)
        assert s["perplexity"] == pytest.approx(float(loss.exp()), rel=1e-5)
    # an untrained model over VOCAB tokens is close to uniform
    assert VOCAB / 3 < body["perplexity"] < VOCAB * 3
    r = dec.post("/score", json={"texts": ["the"]})
    assert r.status_code == 422 and "at least 2" in r.text


def test_concurrent_requests_are_serialized_and_correct(enc):
    texts = [[f"the cat w{i}"] for i in range(24)]
    ref = [enc.post("/embed", json={"texts": t}).json()["embeddings"] for t in texts]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda t: enc.post("/embed", json={"texts": t}).json()["embeddings"], texts))
    assert got == ref


def test_busy_server_answers_429(encoder_lm, monkeypatch):
    import embfactor.eval.embed as embed_mod

    release, entered = threading.Event(), threading.Event()
    real = embed_mod.sentence_embeddings

    def blocking(*a, **kw):
        entered.set()
        release.wait(10)
        return real(*a, **kw)

    monkeypatch.setattr(embed_mod, "sentence_embeddings", blocking)
    client = TestClient(create_app(encoder_lm, Limits(max_pending=1)))
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/embed", json={"texts": ["the cat"]})
        assert entered.wait(10)
        r = client.post("/embed", json={"texts": ["the dog"]})
        assert r.status_code == 429 and "server busy" in r.json()["detail"]
        assert client.get("/health").status_code == 200  # the event loop is not blocked by the model
        release.set()
        assert first.result(timeout=10).status_code == 200


def test_generate_text_library_greedy_stops_at_eos(decoder_lm):
    # Make EOS the argmax everywhere: generation must stop at once with finish_reason "eos".
    head = decoder_lm.model.get_output_embeddings()
    ids = decoder_lm.tokenizer("the cat")["input_ids"]
    orig = head.forward
    head.forward = lambda h: torch.nn.functional.one_hot(torch.full(h.shape[:-1], 2), VOCAB).float()
    try:
        assert generate_text(decoder_lm, ids, max_new_tokens=5) == ([], "eos")
    finally:
        head.forward = orig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app, **config):
    """``app`` served as `embfactor serve` serves it (runner: bound socket, TimedH11Protocol), in a thread."""
    import uvicorn

    from embfactor.server.runner import bind_socket, make_config

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(make_config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield sock.getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive()


def read_until_closed(conn: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took (fails past limit)."""
    t0 = time.monotonic()
    conn.settimeout(limit)
    data = b""
    while True:
        try:
            chunk = conn.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            pytest.fail(f"the server kept the connection open for more than {limit} s (got {data[:80]!r})")
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - t0


def test_real_uvicorn_server_over_loopback(encoder_lm):
    import httpx

    with live_server(create_app(encoder_lm, Limits(max_texts=4))) as (host, port):
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=10) as c:
            assert c.get("/health").json()["status"] == "ok"
            r = c.post("/embed", json={"texts": ["the cat", "the dog"]})
            assert r.status_code == 200 and r.json()["dim"] == 32
            assert c.post("/embed", json={"texts": ["x"] * 5}).status_code == 413
            assert c.post("/generate", json={"prompt": "x"}).status_code == 400
            assert c.get("/docs").status_code == 200
            r = c.post("/embed", content=b'{"texts": ["\\ud800", NaN]}', headers={"content-type": "application/json"})
            assert r.status_code == 422


def test_chunked_body_over_the_limit_is_refused_while_streaming(encoder_lm):
    """A chunked body (no Content-Length) over max_body_bytes gets its 413 before the body has even ended: the
    server stops reading at the limit instead of buffering and parsing the whole body (100 MB each, before)."""
    import httpx

    limit = 64 * 1024
    with live_server(create_app(encoder_lm, Limits(max_body_bytes=limit)), request_timeout=2) as (host, port):
        with socket.create_connection((host, port), timeout=10) as conn:
            conn.sendall(b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            chunk = b"x" * 16384
            for _ in range(2 * limit // len(chunk)):  # twice the limit, and never the final zero-length chunk
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            reply, seconds = read_until_closed(conn, limit=15)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b"max_body_bytes=65536" in body
        # the same through an HTTP client, with a generator body (chunked) of 20x the limit; the server still serves
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as c:
            r = c.post("/embed", content=(chunk for _ in range(80)), headers={"content-type": "application/json"})
            assert r.status_code == 413 and "max_body_bytes=65536" in r.json()["detail"]
            assert r.request.headers["transfer-encoding"] == "chunked" and "content-length" not in r.request.headers
            r = c.post("/embed", content=b'{"texts": ["the cat"]}', headers={"transfer-encoding": "chunked",
                                                                            "content-type": "application/json"})
            assert r.status_code == 200, r.text  # a chunked body under the limit is served
            assert c.get("/health").status_code == 200


def test_load_test_invalid_requests_are_all_4xx_over_loopback(encoder_lm):
    """Every kind of bad request benchmarks/load_test.py sends (NaN, lone surrogate, chunked 2.1 MB, ...) through
    its own client code against a real server: each gets a 4xx, none a 5xx or a dropped connection."""
    import benchmarks.load_test as load_test
    reqs = [{"kind": "invalid", "label": label, "method": method, "path": path, **kw}
            for label, method, path, kw in load_test.invalid_requests("the cat sat " * 200)]
    assert {"NaN as text", "lone surrogate", "chunked body too large"} <= {r["label"] for r in reqs}
    limits = Limits(max_texts=load_test.MAX_TEXTS, max_tokens=load_test.MAX_TOKENS)

    class Counter:
        done_requests = 0

    with live_server(create_app(encoder_lm, limits)) as (host, port):
        results = asyncio.run(load_test.fire(f"http://{host}:{port}", reqs, 4, Counter()))
    bad = [(q["label"], r["status"], r["body"]) for q, r in zip(reqs, results) if not 400 <= r["status"] < 500]
    assert not bad


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # connects and says nothing
        b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-ty",  # half the headers
        b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"te",
        b"POST /embed HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"te\r\n",  # half a chunked body
    ],
    ids=["nothing", "half-headers", "half-body", "half-chunked"],
)
def test_half_sent_requests_are_closed_after_the_request_timeout(encoder_lm, sent):
    """A client that sends part of a request and then nothing is answered 408 and disconnected after
    --request-timeout (uvicorn alone kept such connections open forever)."""
    with live_server(create_app(encoder_lm), request_timeout=1, keep_alive=1) as (host, port):
        with socket.create_connection((host, port), timeout=10) as conn:
            conn.sendall(sent)
            reply, seconds = read_until_closed(conn, limit=10)
    assert reply.startswith(b"HTTP/1.1 408") and b"within 1 seconds" in reply, reply
    assert 0.9 < seconds < 5


def test_keep_alive_and_slow_but_complete_requests(encoder_lm):
    """An idle keep-alive connection closes after --keep-alive; a request that arrives slowly but within the
    request timeout is served, and so is one whose work takes longer than the request timeout."""
    app = create_app(encoder_lm)

    @app.get("/slow-test-endpoint")
    async def slow() -> dict:
        await asyncio.sleep(1.5)
        return {"ok": True}

    with live_server(app, request_timeout=1, keep_alive=1) as (host, port):
        with socket.create_connection((host, port), timeout=10) as conn:
            conn.sendall(b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n")
            time.sleep(0.3)
            conn.sendall(b"content-length: 22\r\n\r\n{\"texts\": ")
            time.sleep(0.3)
            conn.sendall(b'["the cat"]}')
            reply, seconds = read_until_closed(conn, limit=10)  # idle after the response: keep-alive ends it
            assert reply.startswith(b"HTTP/1.1 200") and b'"tokens":[4]' in reply, reply[:200]
            assert seconds < 5
        with socket.create_connection((host, port), timeout=10) as conn:
            conn.sendall(b"GET /slow-test-endpoint HTTP/1.1\r\nhost: x\r\n\r\n")
            reply, _ = read_until_closed(conn, limit=10)
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"ok":true}'), reply


def test_serve_cli_parses_and_defaults_to_loopback(monkeypatch, tiny_bert_dir, capsys):
    from embfactor.server import runner

    seen = {}
    monkeypatch.setattr(runner, "serve", lambda app, sock, **kw: seen.update(app=app, addr=sock.getsockname(), **kw))
    assert main(["serve", str(tiny_bert_dir), "--max-texts", "3", "--port", "0", "--request-timeout", "7"]) == 0
    assert seen["addr"][0] == "127.0.0.1" and seen["addr"][1] > 0  # bound (port 0: the OS chose one)
    assert seen["app"].state.limits.max_texts == 3
    assert (seen["request_timeout"], seen["keep_alive"]) == (7.0, 5.0)
    assert f"serving {tiny_bert_dir} (encoder) on http://127.0.0.1:{seen['addr'][1]}" in capsys.readouterr().err
    assert main(["serve", str(tiny_bert_dir), "--max-texts", "0"]) == 2
    assert "max_texts must be an integer >= 1" in capsys.readouterr().err
    assert main(["serve", str(tiny_bert_dir), "--request-timeout", "0"]) == 2
    assert "request_timeout must be a number of seconds in (0, 86400), got 0.0" in capsys.readouterr().err


def test_serve_on_a_busy_port_exits_2_before_loading_or_announcing(monkeypatch, tiny_bert_dir, capsys):
    from embfactor.cli import serve_cmd

    monkeypatch.setattr(serve_cmd, "build_app", lambda *a, **k: pytest.fail("loaded the model before binding"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tiny_bert_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use" in err
    assert "serving" not in err and "Traceback" not in err
    assert main(["serve", str(tiny_bert_dir), "--port", "70000"]) == 2
    assert "--port must be in 0..65535, got 70000" in capsys.readouterr().err
    assert main(["serve", str(tiny_bert_dir), "--host", "no-such-host.invalid"]) == 2
    assert "--host 'no-such-host.invalid' is not an address" in capsys.readouterr().err


def test_serve_subprocess_announces_the_bound_url_which_answers(tiny_bert_dir):
    """`embfactor serve --port 0` in its own process: the URL it announces (after binding) serves /health."""
    import subprocess
    import sys

    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "embfactor.cli.main", "serve", str(tiny_bert_dir), "--port", "0", "--log-level",
         "warning"], stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stderr.readline()
        assert line.startswith("serving "), line
        url = line.split(" on ")[1].split()[0]
        assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok", "kind": "encoder"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_compressed_tied_llama_folder_serves(tiny_llama_tied, tmp_path):
    """A saved decoder with a tied head (Llama): /info reads embfactor.json; /generate matches HF greedy decoding."""
    from embfactor.surgery import save_compressed

    factorize_(tiny_llama_tied, rank=8)
    tok = word_tokenizer()
    save_compressed(tiny_llama_tied, tmp_path / "llama-r8", tokenizer=tok)
    lm = load_model(tmp_path / "llama-r8")
    client = TestClient(create_app(lm))
    info = client.get("/info").json()
    assert info["kind"] == "decoder" and info["tied_head"] is True and info["rank"] == 8
    assert info["embedding_params_after"] == 8 * (VOCAB + D)
    body = client.post("/generate", json={"prompt": "the cat sat", "max_new_tokens": 8}).json()
    ids = torch.tensor([tok("the cat sat")["input_ids"]])
    ref = lm.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=2)
    assert body["text"] == tok.decode(ref[0, 3:], skip_special_tokens=True) and body["new_tokens"] == 8
    assert client.post("/score", json={"texts": ["the cat sat on the mat"]}).json()["scores"][0]["tokens"] == 5


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def test_oversized_bodies_get_their_413_whatever_the_client(encoder_lm):
    """Clients that write the whole body before reading the answer (urllib, which also sends Connection: close;
    requests) get the 413 and its JSON for bodies of 2, 20 and 200 MiB over the default 2 MB limit: the server no
    longer closes with the body unread (a reset: urllib saw ConnectionResetError at 20 MiB every time), and what it
    discards is not kept (the process grows by far less than one body while they are sent)."""
    import urllib.error
    import urllib.request

    requests = pytest.importorskip("requests")
    body = b"x" * (200 << 20)
    with live_server(create_app(encoder_lm)) as (host, port):
        url = f"http://{host}:{port}/embed"

        def post(client: str, size: int) -> tuple[int, dict]:
            # no copy of the 200 MiB body (urllib needs bytes: it copies the 20 MiB and 2 MiB slices)
            data = body if size == len(body) else memoryview(body)[:size] if client == "requests" else body[:size]
            if client == "requests":
                r = requests.post(url, data=data, headers={"content-type": "application/json"}, timeout=60)
                return r.status_code, r.json()
            req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        peak, stop = [0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_bytes())
                time.sleep(0.005)

        base = _rss_bytes()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            for size in (200 << 20, 20 << 20, 2 << 20):
                for client in ("urllib", "requests"):
                    status, answer = post(client, size)
                    assert status == 413 and "max_body_bytes=2000000" in answer["detail"], (client, size, answer)
        finally:
            stop.set()
            sampler.join()
        # measured: +21 MiB (urllib's 20 MiB copy); a server that kept a 200 MiB body would add 200 MiB
        assert peak[0] - base < 64 << 20, f"RSS grew by {(peak[0] - base) >> 20} MiB"


def test_lingering_close_ends_after_the_request_timeout(encoder_lm):
    """A client that stops sending its oversized body after the 413 reads the answer and then an end of stream; the
    server discards for at most --request-timeout seconds and then closes (its sends fail)."""
    with live_server(create_app(encoder_lm, Limits(max_body_bytes=1000)), request_timeout=1) as (host, port):
        with socket.create_connection((host, port), timeout=10) as conn:
            conn.sendall(b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\n"
                         b"content-length: 10000000\r\n\r\n" + b"x" * 100_000)
            reply, seconds = read_until_closed(conn, limit=10)
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 413") and b"max_body_bytes=1000" in body and seconds < 5
            conn.sendall(b"x" * 100_000)  # lingering: still read and discarded
            time.sleep(2)
            with pytest.raises(OSError):  # closed after the request timeout: a reset
                for _ in range(100):
                    conn.sendall(b"x" * 100_000)
                    time.sleep(0.01)
