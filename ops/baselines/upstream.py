"""The one HTTP call the baselines make: OpenAI-compatible chat completions over httpx.

Written the way a team's first integration is: one client per process, no fallback tier, the
price of the call worked out from the usage the provider reports. Errors other than transport
failures and 429/5xx (which the Celery task retries) are final.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import httpx

from ops.baselines.settings import BaselineSettings, load_baseline_settings


class UpstreamError(Exception):
    """The provider refused or broke the call; ``retryable`` for 429 and 5xx."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status == 429 or self.status >= 500


@dataclass(frozen=True)
class Reply:
    """A completed call: its text, usage and price."""

    text: str
    model: str
    tokens_in: int
    tokens_out: int
    cost: float


class Upstream:
    """A chat-completions client for the baseline's tier (thread-safe: httpx.Client is)."""

    def __init__(self, settings: BaselineSettings) -> None:
        self.settings = settings
        tier = settings.tier
        headers = {"Content-Type": "application/json"}
        if settings.api_key:
            if tier.auth_header.lower() == "authorization":
                headers["Authorization"] = f"Bearer {settings.api_key}"
            else:
                headers[tier.auth_header] = settings.api_key
        self._url = tier.base_url.rstrip("/") + "/chat/completions"
        self._client = httpx.Client(headers=headers, timeout=tier.timeout_s,
                                    limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

    def complete(self, messages: list[dict[str, str]], *, max_tokens: int, json_mode: bool = False) -> Reply:
        """One call; raises ``UpstreamError`` on any failure."""
        tier = self.settings.tier
        body: dict[str, Any] = {"model": tier.model, "messages": messages, "max_tokens": max_tokens}
        if json_mode:
            body["response_format"] = {"type": "json_object"}
        try:
            response = self._client.post(self._url, json=body)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{tier.name}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise UpstreamError(f"{tier.name} answered {response.status_code}", status=response.status_code)
        try:
            data = response.json()
            text = data["choices"][0]["message"]["content"]
            usage = data.get("usage") or {}
            tokens_in, tokens_out = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        except (ValueError, KeyError, IndexError, TypeError):
            raise UpstreamError(f"{tier.name} sent a malformed body", status=200) from None
        cost = (tokens_in * tier.price_in_per_1k + tokens_out * tier.price_out_per_1k) / 1000
        return Reply(text=str(text), model=str(data.get("model") or tier.model), tokens_in=tokens_in,
                     tokens_out=tokens_out, cost=cost)


@lru_cache(maxsize=1)
def upstream() -> Upstream:
    """This process's client (built on first use, so after a prefork pool has forked)."""
    return Upstream(load_baseline_settings())
