"""A cached, concurrent chat client for any OpenAI-compatible endpoint (the ``openai`` package).

Every request and its answer is stored under ``cache_dir`` as ``<aa>/<sha256>.json``, keyed by
the model name, the messages and the sampling settings (never the API key or the endpoint URL),
and written atomically as soon as the answer arrives: a rerun, or a run resumed after the
server died, sends only the requests it has no answer for. ``requests_sent`` and
``cache_hits`` count both kinds.

The API key is read from the environment variable named ``api_key_env`` and handed to the
openai client only; it is not logged or stored. Before the first request that the cache cannot
answer, one quick request (``GET /models``, no retries, ``connect_timeout_s``) checks that the
endpoint answers, so a wrong URL or a stopped server fails in seconds with
``EndpointError`` naming the URL. Retries with exponential backoff on connection errors,
timeouts, 429 and 5xx are the openai client's own (``max_retries``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

from sae_darkmatter._io import read_json, write_json
from sae_darkmatter.errors import DarkMatterError

if TYPE_CHECKING:
    from openai import APIStatusError

log = logging.getLogger(__name__)

T = TypeVar("T")
CACHE_VERSION = 1
NO_KEY = "no-key"  # sent when the variable is unset: local servers accept any key


class EndpointError(DarkMatterError):
    """The chat endpoint cannot be reached, rejects the key, or keeps failing; says what to
    check."""


def safe_url(url: str) -> str:
    """``url`` without user:password, query or fragment (safe to log and store)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _openai() -> Any:
    try:
        import openai
    except ImportError:
        raise DarkMatterError(
            "auto-interpretability needs the openai package: pip install "
            "'sae-darkmatter[autointerp]'"
        ) from None
    return openai


def cache_key(model: str, messages: Sequence[dict[str, str]], params: dict[str, Any]) -> str:
    """sha256 of the request's content: model, messages, sampling settings (no key, no URL)."""
    blob = json.dumps(
        {"v": CACHE_VERSION, "model": model, "messages": list(messages), "params": params},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class ChatClient:
    """Chat completions through ``openai.OpenAI`` with a disk cache and a thread pool."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        cache_dir: str | Path,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 4,
        max_retries: int = 3,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
    ):
        if not model:
            raise DarkMatterError("no model name given for the chat endpoint (--model)")
        openai = _openai()
        self.url = safe_url(base_url)
        self.model = model
        self.api_key_env = api_key_env
        self.cache_dir = Path(cache_dir)
        self.concurrency = concurrency
        self.connect_timeout_s = connect_timeout_s
        self.requests_sent = 0
        self.cache_hits = 0
        self._lock = threading.Lock()  # counters
        self._check_lock = threading.Lock()  # one endpoint check, before the first request
        self._checked = False
        if not os.environ.get(api_key_env):
            log.info("%s is not set: sending no API key (fine for local servers)", api_key_env)
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=os.environ.get(api_key_env) or NO_KEY,
            max_retries=max_retries,
            timeout=openai.Timeout(timeout_s, connect=connect_timeout_s),
        )

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _fail(self, err: Exception) -> EndpointError:
        """An ``EndpointError`` for an openai exception, saying what to check."""
        openai = _openai()
        status = cast("APIStatusError", err)  # read only in the branches where it is one
        if isinstance(err, openai.AuthenticationError | openai.PermissionDeniedError):
            return EndpointError(
                f"{self.url} rejected the API key (HTTP {status.status_code}); check the "
                f"environment variable {self.api_key_env}"
            )
        if isinstance(err, openai.APITimeoutError):
            return EndpointError(
                f"{self.url} did not answer in time; check that the server is up and not "
                "overloaded, or lower --concurrency / raise the timeout"
            )
        if isinstance(err, openai.APIConnectionError):
            return EndpointError(
                f"cannot reach the chat endpoint at {self.url}; check that the server is "
                "running and the URL (it usually ends in /v1, e.g. http://127.0.0.1:8000/v1)"
            )
        if isinstance(err, openai.NotFoundError):
            return EndpointError(
                f"{self.url}: not found (HTTP 404) for model {self.model!r}; check the "
                "model name and that the URL ends in /v1"
            )
        if isinstance(err, openai.APIStatusError):
            return EndpointError(
                f"{self.url} answered HTTP {status.status_code} for model {self.model!r}: "
                f"{str(status.message)[:300]}"
            )
        return EndpointError(f"request to {self.url} failed: {type(err).__name__}")

    def check(self) -> None:
        """One quick ``GET /models`` (no retries): fails fast with ``EndpointError`` when
        unreachable."""
        openai = _openai()
        try:
            self._client.with_options(
                max_retries=0, timeout=self.connect_timeout_s + 5
            ).models.list()
        except openai.NotFoundError:
            pass  # some compatible servers have no /models; the chat requests will tell
        except openai.OpenAIError as err:
            raise self._fail(err) from None
        self._checked = True

    def complete(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        response_format: dict | None = None,
    ) -> str:
        """The answer's text, from the cache or from one chat completion (then cached).

        ``response_format`` (e.g. a JSON schema, see ``prompts.response_format``) is passed as is.
        """
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        if response_format is not None:
            params["response_format"] = response_format
        key = cache_key(self.model, messages, params)
        path = self._path(key)
        if path.is_file():
            try:
                answer = read_json(path)["answer"]
                with self._lock:
                    self.cache_hits += 1
                return answer
            except (OSError, ValueError, KeyError):
                log.warning("unreadable cache entry %s: asking again", path.name)
        with self._check_lock:
            if not self._checked:
                self.check()
        openai = _openai()
        try:
            response = self._client.chat.completions.create(
                model=self.model, messages=list(messages), **params
            )
        except openai.OpenAIError as err:
            raise self._fail(err) from None
        with self._lock:
            self.requests_sent += 1
        choice = response.choices[0] if response.choices else None
        answer = (choice.message.content if choice else None) or ""
        write_json(path, {"version": CACHE_VERSION, "model": self.model, "messages": list(messages),
                          "params": params, "answer": answer,
                          "finish_reason": choice.finish_reason if choice else None})
        return answer

    def map(
        self,
        fn: Callable[[T], Any],
        items: Sequence[T],
        *,
        on_done: Callable[[], None] | None = None,
    ) -> list[Any]:
        """``[fn(item) for item in items]`` on ``concurrency`` threads, in order.

        The first error cancels the requests not yet started and is raised once the running
        ones end (their answers are cached).
        """
        results: list[Any] = [None] * len(items)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.exception() is not None:
                        for p in pending:
                            p.cancel()
                        raise f.exception()  # type: ignore[misc]
                    results[futures[f]] = f.result()
                    if on_done:
                        on_done()
        return results
