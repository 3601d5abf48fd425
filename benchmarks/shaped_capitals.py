"""The capitals task with the city first and a shaped reward: the tasks of the CPU demonstration's
first attempts (`heads.py --task choice | open` reads adapters trained on them)."""

from __future__ import annotations

import random

from tinylab.tasks.base import Example, completion_text
from tinylab.tasks.capitals import CAPITALS, CapitalsTask

__all__ = ["CapitalChoices", "ShapedCapitals"]


class ShapedCapitals(CapitalsTask):
    """Capitals with the training reward described in the module docstring (scoring unchanged)."""

    name = "capitals_shaped"

    def __init__(self, starts: float = 0.5, short: float = 0.0, contains: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.starts, self.short, self.contains = starts, short, contains

    def starts_with_city(self, text: str, answer: str) -> bool:
        words = text.split()
        return any(self.score(" ".join(words[:k]), answer).correct_strict for k in (1, 2, 3))

    def reward(self, completions, answers=None, **kwargs):
        answers = kwargs.get("answer") if answers is None else answers
        out = []
        for completion, answer in zip(completions, answers):
            text = completion_text(completion)
            score = self.score(text, answer)
            if score.correct_strict:
                out.append(1.0)
            elif self.starts_with_city(text, answer):
                out.append(self.starts)
            elif score.formatted:
                out.append(self.short)
            elif score.correct_flexible:
                out.append(self.contains)
            else:
                out.append(0.0)
        return out


class CapitalChoices(ShapedCapitals):
    """The capitals question with three cities to choose from (the right one and two other
    countries' capitals, in a seeded order): "Which city is the capital of Norway: Lima, Oslo or
    Madrid? Answer with the city name only." Same split by country, same scoring. Shaped reward:
    1 strict-correct; `short` for a reply that is one of the wrong options (the form of an answer,
    wrong); `starts` for a reply that starts with the right city and goes on; else 0."""

    name = "capitals_choice"

    def _groups(self):
        cities = [city for _, city, *_ in CAPITALS]
        groups, self.options = [], {}
        for country, city, *_ in CAPITALS:
            rng = random.Random(f"choices/{country}")
            options = [city, *rng.sample([c for c in cities if c != city], 2)]
            rng.shuffle(options)
            self.options[city] = options
            question = f"Which city is the capital of {country}: {options[0]}, {options[1]} or {options[2]}?"
            prompt = [{"role": "user", "content": f"{question} Answer with the city name only."}]
            groups.append((country, [Example(prompt, city, city)]))
        return groups

    def reward(self, completions, answers=None, **kwargs):
        answers = kwargs.get("answer") if answers is None else answers
        if not hasattr(self, "options"):
            self._split()
        out = []
        for completion, answer in zip(completions, answers):
            text = completion_text(completion)
            if self.score(text, answer).correct_strict:
                out.append(1.0)
            elif any(self.score(text, o).correct_strict for o in self.options.get(answer, ()) if o != answer):
                out.append(self.short)
            elif self.starts_with_city(text, answer):
                out.append(self.starts)
            else:
                out.append(0.0)
        return out
