"""An OpenAI-compatible endpoint backed by forkrl's engine, recording every token it serves.

    endpoint = PolicyEndpoint(engine, tokenizer, recorder)   # binds 127.0.0.1, a random API key
    endpoint.start()
    client = openai.OpenAI(base_url=endpoint.base_url("episode-7"), api_key=endpoint.api_key)
    ...
    endpoint.stop()

Routes: `POST /v1/chat/completions` (messages, temperature, top_p, max_tokens / max_completion_tokens,
stop, n, tools, seed; `stream: false`) and `GET /v1/models`, also under `/episodes/<id>/v1/...`. The
episode a request belongs to is that path segment, else the `X-Episode-Id` header, else the `user`
field. Every request needs `Authorization: Bearer <the run's key>`: other users of the machine can
neither drive nor read the policy.

Batching: requests wait in a queue; one dispatcher thread takes everything queued whenever the engine
is free and runs it as one `engine.generate` call, so concurrent episodes share the engine's
continuous batch (`engine_calls` counts the calls). The HTTP server (aiohttp) runs its own event loop
in a background thread.

With `fixed_temperature` set (training: the learner recomputes log-probs at the recipe's temperature),
a request's own temperature and top_p are ignored, so what is recorded is what the learner scores.
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from concurrent.futures import Future

from forkrl.agents.recorder import EpisodeRecorder
from forkrl.types import GenerationRequest, SamplingParams

log = logging.getLogger("forkrl")
MODEL_NAME = "forkrl-policy"


class RequestError(Exception):
    """A request the API refuses: its HTTP status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class PolicyEndpoint:
    def __init__(self, engine, tokenizer, recorder: EpisodeRecorder | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, max_tokens: int = 256, fixed_temperature: float | None = None, seed: int = 0,
                 batch_window_s: float = 0.005):
        self.engine, self.tokenizer = engine, tokenizer
        self.recorder = recorder or EpisodeRecorder(tokenizer)
        self.host, self.port = host, port
        self.api_key = "forkrl-" + secrets.token_urlsafe(24)
        self.max_tokens, self.fixed_temperature = max_tokens, fixed_temperature
        self.seed, self.batch_window_s = seed, batch_window_s
        self.version = 0                     # the policy version stamped on recorded tokens
        self.engine_calls = 0
        self.requests = 0
        self._queue: queue.Queue = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._ready = threading.Event()
        self._stopping = False
        self._runner = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> PolicyEndpoint:
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            from forkrl.errors import missing_dependency
            raise missing_dependency("aiohttp", "agents", "the agent endpoint") from None
        self._threads = [threading.Thread(target=self._serve, name="forkrl-endpoint", daemon=True),
                         threading.Thread(target=self._dispatch, name="forkrl-dispatch", daemon=True)]
        for t in self._threads:
            t.start()
        if not self._ready.wait(30):
            raise RuntimeError("the agent endpoint did not start")
        return self

    def stop(self) -> None:
        self._stopping = True
        self._queue.put(None)
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        for t in self._threads:
            t.join(10)

    def base_url(self, episode: str | None = None) -> str:
        root = f"http://{self.host}:{self.port}"
        return f"{root}/episodes/{episode}/v1" if episode else f"{root}/v1"

    # -- HTTP (the server's thread) ----------------------------------------------------------------
    def _serve(self) -> None:
        from aiohttp import web
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for prefix in ("", "/episodes/{episode}"):
            app.router.add_post(prefix + "/v1/chat/completions", self._chat)
            app.router.add_get(prefix + "/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, self.host, self.port)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def _authorised(self, request) -> bool:
        given = request.headers.get("Authorization", "")
        return secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    @staticmethod
    def _error(status: int, message: str, kind: str = "invalid_request_error"):
        from aiohttp import web
        return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)

    async def _models(self, request):
        from aiohttp import web
        if not self._authorised(request):
            return self._error(401, "missing or wrong API key", "authentication_error")
        return web.json_response({"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0,
                                                              "owned_by": "forkrl"}]})

    async def _chat(self, request):
        from aiohttp import web
        if not self._authorised(request):
            return self._error(401, "missing or wrong API key", "authentication_error")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return self._error(400, "the body is not JSON")
        episode = (request.match_info.get("episode") or request.headers.get("X-Episode-Id")
                   or (body.get("user") if isinstance(body, dict) else None) or "default")
        future: Future = Future()
        self._queue.put((episode, body, future))
        try:
            response = await asyncio.wrap_future(future)
        except RequestError as e:
            return self._error(e.status, str(e))
        except Exception as e:  # noqa: BLE001 - the server answers; the run's log says what broke
            log.exception("agent endpoint: request of episode %s failed", episode)
            return self._error(500, f"{type(e).__name__}: {e}", "server_error")
        return web.json_response(response)

    # -- batching (the dispatcher's thread: the only one that calls the engine) ---------------------
    def _dispatch(self) -> None:
        while not self._stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            deadline = time.monotonic() + self.batch_window_s
            while True:   # everything already queued, and what arrives within the window
                try:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if item is None:
                    self._stopping = True
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list) -> None:
        plans = []
        for episode, body, future in batch:
            try:
                plans.append((future, self._plan(episode, body)))
            except RequestError as e:
                future.set_exception(e)
            except Exception as e:  # noqa: BLE001
                future.set_exception(e)
        if not plans:
            return
        requests = [GenerationRequest(p["prompt_ids"], p["params"], keep_kv=True) for _, p in plans]
        self.requests += len(requests)
        self.engine_calls += 1
        seed = self.seed * 1_000_003 + self.engine_calls
        try:
            outs = self.engine.generate(requests, seed=seed)
        except Exception as e:  # noqa: BLE001
            for future, _ in plans:
                future.set_exception(e)
            return
        for (future, plan), completions in zip(plans, outs):
            try:
                future.set_result(self._respond(plan, completions))
            except Exception as e:  # noqa: BLE001
                future.set_exception(e)

    def _plan(self, episode: str, body) -> dict:
        """The request checked and turned into prompt ids and sampling parameters."""
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise RequestError(400, "messages must be a non-empty list of {role, content} objects")
        if body.get("stream"):
            raise RequestError(400, "stream: true is not supported; ask with stream: false")
        n = body.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= 64:
            raise RequestError(400, "n must be an integer from 1 to 64")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self.max_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError(400, "max_tokens must be a positive integer")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        temperature, top_p = body.get("temperature"), body.get("top_p")
        if self.fixed_temperature is not None:
            temperature, top_p = self.fixed_temperature, 1.0
        params = SamplingParams(temperature=1.0 if temperature is None else float(temperature),
                                top_p=1.0 if top_p is None else float(top_p),
                                max_tokens=min(max_tokens, self.max_tokens), n=n, stop=stop)
        tools = body.get("tools")
        prompt_ids, extends = self.recorder.prompt_for(episode, messages, tools)
        return {"episode": episode, "messages": messages, "tools": tools, "prompt_ids": prompt_ids,
                "extends": extends, "params": params}

    def _respond(self, plan: dict, completions) -> dict:
        choices = []
        for i, c in enumerate(completions):
            text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
            self.recorder.record(plan["episode"], plan["messages"], plan["tools"], plan["prompt_ids"], plan["extends"],
                                 c, text, self.version)
            message = {"role": "assistant", "content": text}
            calls = _tool_calls(text) if plan["tools"] else []
            if calls:
                message["tool_calls"] = calls
            finish = {"eos": "stop", "stop": "stop", "length": "length"}.get(c.finish, "stop")
            choices.append({"index": i, "message": message, "logprobs": None,
                            "finish_reason": "tool_calls" if calls else finish})
        completion_tokens = sum(len(c.token_ids) for c in completions)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": MODEL_NAME, "choices": choices,
                "usage": {"prompt_tokens": len(plan["prompt_ids"]), "completion_tokens": completion_tokens,
                          "total_tokens": len(plan["prompt_ids"]) + completion_tokens}}


def _tool_calls(text: str) -> list[dict]:
    """Tool calls written in the chat template's native form, <tool_call>{"name", "arguments"}</tool_call>."""
    import re
    calls = []
    for m in re.finditer(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", text, flags=re.S):
        try:
            data = json.loads(m.group(1))
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            args = data.get("arguments", {})
            calls.append({"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                          "function": {"name": data["name"],
                                       "arguments": args if isinstance(args, str) else json.dumps(args)}})
    return calls
