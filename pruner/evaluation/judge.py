"""LLM-judge scoring, 0 to 100, the way the paper does it.

The judge sees ``pruner/assets/judge_prompt.txt`` filled with the persona, question and answer and
is asked for one token. The score is the probability-weighted mean of the integers 0..100 among the
judge's top log-probabilities for that first token (OpenAI-compatible ``logprobs: true,
top_logprobs: 20, max_tokens: 1``), renormalised over the integer tokens. If the integers carry too
little probability (or the server returns no log-probabilities) the reply text is parsed for a number.

Two judges share one interface, ``judge.score(prompt) -> JudgeScore``:

* :class:`OpenAIJudge` — any OpenAI-compatible ``/chat/completions`` endpoint, ``urllib`` only,
  key from ``$OPENAI_API_KEY`` (optional for local servers).
* :class:`HFJudge` — a local Hugging Face causal LM directory; the same scoring over its own
  next-token distribution restricted to tokens that decode to an integer 0..100.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

MIN_NUMBER_MASS = 0.25
_NUMBER = re.compile(r"(?<![\d.])(\d{1,3})(?![\d])")


@dataclass
class JudgeScore:
    """One judged answer: ``score`` in [0, 100] or ``None``; ``how`` is ``"logprobs"``, ``"text"`` or ``"none"``;
    ``mass`` is the probability the integer tokens carried (``None`` when not from log-probabilities)."""

    score: float | None
    how: str
    mass: float | None = None
    text: str = ""


def load_judge_prompt(path: str | Path | None = None) -> str:
    """The judge prompt template (placeholders ``{persona_name}``, ``{persona_description}``, ``{question}``, ``{answer}``)."""
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    return (Path(__file__).resolve().parent.parent / "assets" / "judge_prompt.txt").read_text(encoding="utf-8")


def format_judge_prompt(template: str, persona_name: str, persona_description: str, question: str, answer: str) -> str:
    """Fill the judge template; braces inside the values are kept verbatim."""
    return template.format(
        persona_name=persona_name, persona_description=persona_description, question=question, answer=answer
    )


def integer_token(token: str) -> int | None:
    """The integer 0..100 a token stands for (surrounding whitespace ignored, no leading zeros), else ``None``."""
    text = token.strip()
    if not text.isdigit() or not text.isascii():
        return None
    value = int(text)
    if str(value) != text or value > 100:
        return None
    return value


def score_from_top_logprobs(top_logprobs: list[dict], min_mass: float = MIN_NUMBER_MASS) -> tuple[float | None, float]:
    """Probability-weighted mean of the integer tokens 0..100 among ``top_logprobs``.

    ``top_logprobs``: ``[{"token": str, "logprob": float}, ...]`` (the OpenAI shape). Tokens that
    decode to the same integer add up. Returns ``(score, mass)`` where ``mass`` is the total
    probability of the integer tokens; ``score`` is ``None`` when ``mass < min_mass``.
    """
    weighted, mass = 0.0, 0.0
    for entry in top_logprobs:
        value = integer_token(str(entry.get("token", "")))
        logprob = entry.get("logprob")
        if value is None or logprob is None or not math.isfinite(float(logprob)):
            continue
        p = math.exp(float(logprob))
        weighted += p * value
        mass += p
    if mass <= 0.0 or mass < min_mass:
        return None, mass
    return weighted / mass, mass


def parse_score_text(text: str) -> float | None:
    """The first integer 0..100 in a judge's reply text (fallback scoring), else ``None``."""
    for match in _NUMBER.finditer(text or ""):
        value = int(match.group(1))
        if 0 <= value <= 100:
            return float(value)
    return None


def score_from_response(payload: dict, min_mass: float = MIN_NUMBER_MASS) -> JudgeScore:
    """Score an OpenAI ``chat.completion`` response: log-probabilities first, reply text as fallback."""
    choice = (payload.get("choices") or [{}])[0]
    text = ((choice.get("message") or {}).get("content")) or choice.get("text") or ""
    content = ((choice.get("logprobs") or {}).get("content")) or []
    mass = None
    if content:
        score, mass = score_from_top_logprobs(content[0].get("top_logprobs") or [], min_mass)
        if score is not None:
            return JudgeScore(score, "logprobs", mass, text)
    parsed = parse_score_text(text)
    return JudgeScore(parsed, "text" if parsed is not None else "none", mass, text)


class OpenAIJudge:
    """Judge through an OpenAI-compatible endpoint (``urllib`` only).

    ``endpoint``: a base URL such as ``http://host:8000/v1`` (``/chat/completions`` is appended) or
    the full ``.../chat/completions`` URL. ``api_key`` defaults to ``$OPENAI_API_KEY``.
    """

    def __init__(self, endpoint: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 2, min_mass: float = MIN_NUMBER_MASS) -> None:
        url = endpoint.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.timeout, self.retries, self.min_mass = timeout, retries, min_mass

    @property
    def name(self) -> str:
        """How the report names this judge."""
        return f"openai-compatible {self.model} at {self.url}"

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        error: Exception | None = None
        for _ in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as exc:
                error = exc
                if isinstance(exc, urllib.error.HTTPError) and 400 <= exc.code < 500 and exc.code != 429:
                    break
        raise RuntimeError(f"judge request to {self.url} failed: {error}") from error

    def score(self, prompt: str) -> JudgeScore:
        """Score one filled judge prompt; asks once more for a short text reply if the first yields nothing."""
        messages = [{"role": "user", "content": prompt}]
        body = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0,
                "logprobs": True, "top_logprobs": 20}
        result = score_from_response(self._post(body), self.min_mass)
        if result.score is None:
            retry = score_from_response(self._post({"model": self.model, "messages": messages, "max_tokens": 8, "temperature": 0}))
            if retry.score is not None:
                return JudgeScore(retry.score, "text", result.mass, retry.text)
        return result


class HFJudge:
    """Judge with a local Hugging Face causal LM: the same weighted mean over its next-token distribution.

    Only vocabulary entries that decode to an integer 0..100 count (a digit-by-digit tokenizer
    therefore scores on 0..9 only, i.e. the first digit; the report says which judge was used).
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu", min_mass: float = MIN_NUMBER_MASS,
                 model=None, tokenizer=None) -> None:
        if model is None or tokenizer is None:
            from persona_kernels.hf.default_model import load_model

            model, tokenizer = load_model(model_dir)
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.device, self.min_mass = device, min_mass
        self.model_dir = str(model_dir)
        ids, values = [], []
        for token_id in range(len(tokenizer)):
            value = integer_token(tokenizer.decode([token_id]))
            if value is not None:
                ids.append(token_id)
                values.append(value)
        if not ids:
            raise ValueError(f"judge tokenizer in {model_dir} has no token decoding to an integer 0..100")
        self.number_ids = torch.tensor(ids, device=device)
        self.number_values = torch.tensor(values, dtype=torch.float64)

    @property
    def name(self) -> str:
        """How the report names this judge."""
        return f"local Hugging Face model {self.model_dir}"

    @torch.no_grad()
    def score(self, prompt: str) -> JudgeScore:
        """Score one filled judge prompt from the next-token distribution after the chat template."""
        messages = [{"role": "user", "content": prompt}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt + "\n"
        ids = self.tokenizer(text, return_tensors="pt").input_ids.to(self.device)
        logits = self.model(input_ids=ids).logits[0, -1].float()
        probs = torch.softmax(logits, dim=-1)[self.number_ids].double().cpu()
        mass = float(probs.sum())
        if mass > 0 and mass >= self.min_mass:
            return JudgeScore(float((probs * self.number_values).sum() / mass), "logprobs", mass)
        out = self.model.generate(ids, max_new_tokens=6, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        reply = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        parsed = parse_score_text(reply)
        return JudgeScore(parsed, "text" if parsed is not None else "none", mass, reply)
