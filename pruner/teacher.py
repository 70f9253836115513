"""Teachers that write persona-voiced answers: the base model itself, another local HF model, or an endpoint.

Answers are cached in a JSONL file keyed by teacher identity + persona hash + instruction hash +
generation settings, appended batch by batch, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable

from tqdm.auto import tqdm

from .chat import encode_prefix, split_prompts
from .data import JsonlCache, text_hash
from .generate import generate_answers


class LocalTeacher:
    """A local causal LM prompted with the persona as system prompt (batched, shared prefix)."""

    def __init__(self, model, tokenizer, identity: str, batch_size: int = 16):
        self.model, self.tokenizer, self.identity, self.batch_size = model, tokenizer, identity, batch_size

    def answer(self, system: str | None, questions: list[str], max_new_tokens: int, temperature: float, seed: int,
               on_batch: Callable[[list[str], list[str]], None], progress: bool = True) -> None:
        """Generate answers for ``questions`` and hand each finished batch to ``on_batch(questions, answers)``."""
        prompts = split_prompts(self.tokenizer, system, questions)
        past = encode_prefix(self.model, prompts.prefix)
        order = sorted(range(len(questions)), key=lambda i: len(prompts.questions[i]))  # less padding
        bar = tqdm(total=len(questions), desc="teacher answers", disable=not progress, leave=False)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            answers = generate_answers(
                self.model, self.tokenizer, prompts.prefix, [prompts.questions[i] for i in chunk],
                max_new_tokens, temperature, seed + start, prefix_past=past,
            )
            on_batch([questions[i] for i in chunk], answers)
            bar.update(len(chunk))
        bar.close()


class EndpointTeacher:
    """An OpenAI-compatible chat-completions endpoint (key from ``OPENAI_API_KEY``), one request per question."""

    def __init__(self, url: str, model_name: str, timeout: float = 120.0):
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.model_name, self.timeout = model_name, timeout
        self.identity = f"endpoint:{self.url}:{model_name}"

    def _ask(self, system: str | None, question: str, max_new_tokens: int, temperature: float) -> str:
        messages = ([] if system is None else [{"role": "system", "content": system}]) + [{"role": "user", "content": question}]
        body = json.dumps({"model": self.model_name, "messages": messages, "max_tokens": max_new_tokens, "temperature": temperature}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get("OPENAI_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            reply = json.loads(response.read().decode())
        try:
            return str(reply["choices"][0]["message"]["content"]).strip()
        except (KeyError, IndexError, TypeError) as error:
            raise RuntimeError(f"teacher endpoint {self.url} returned an unexpected reply: {str(reply)[:200]}") from error

    def answer(self, system, questions, max_new_tokens, temperature, seed, on_batch, progress=True) -> None:
        """Ask the endpoint each question; hand answers one by one to ``on_batch``."""
        for question in tqdm(questions, desc="teacher answers", disable=not progress, leave=False):
            on_batch([question], [self._ask(system, question, max_new_tokens, temperature)])


def cached_answers(teacher, cache: JsonlCache, system: str | None, questions: list[str], max_new_tokens: int,
                   temperature: float = 0.0, seed: int = 0, progress: bool = True) -> list[str]:
    """Answers to ``questions`` by ``teacher`` with ``system`` as system prompt, generating only what the cache lacks."""
    settings = f"{teacher.identity}|{text_hash(system or '')}|{max_new_tokens}|{temperature}|{seed}"

    def key(question: str) -> str:
        return f"{settings}|{text_hash(question)}"

    missing = [q for q in dict.fromkeys(questions) if cache.get(key(q)) is None]
    if missing:
        def store(batch_questions: list[str], answers: list[str]) -> None:
            cache.put_many([{"key": key(q), "question": q, "answer": a} for q, a in zip(batch_questions, answers)])

        teacher.answer(system, missing, max_new_tokens, temperature, seed, store, progress)
    return [cache.get(key(q))["answer"] for q in questions]
