"""Instructions shaped like real public instruction datasets, the same for the same seed.

``dedup_data.instructions`` is teacher-like but short (11 tokens): it flatters the
pruning. Real sets (Alpaca, Dolly, Super-NaturalInstructions, the Evol-Instruct
family) are long and templated, and this set copies those traits:

    framed     60%: a shared frame ("You are given ... Your task is to ...", "Below
               is an instruction ... Write a response that ...", "In this task, you
               will ...", "Definition: ... Input: ... Output:", "Act as ..."), a task
               sentence, 0-5 constraints (often as a numbered list) and an embedded
               input of 1-6 sentences: function words and a Zipf vocabulary of
               60,000 made-up words, as real text has
    short      15%: dedup_data's short teacher-like instructions
    near-copy  25%: an earlier instruction (usually recent) changed by 1-3 of: a
               synonym swap, a constraint added or dropped, another embedded input
               under the same frame and task, sentences reordered, a word dropped,
               a polite prefix

Median about 40 words, a quarter over 60 and a few up to 150-200.

    >>> len(instructions(3, seed=1))
    3
"""

from __future__ import annotations

import argparse
import json
import random

from dedup_data import CLAUSES, DOCS, PREFIXES, PROFESSIONS, SYLLABLES, TONES, _Generator, _zipf_picker

FRAMES = [
    "You are given {a_doc} about {topic}. Your task is to {task}. {constraints}{doc_label}: {input}",
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. Instruction: {Task} about {topic}. {constraints}"
    "Input: {input}",
    "In this task, you will be shown {a_doc}. You need to {task}. {constraints}{input}",
    "Definition: In this task you are given {a_doc} about {topic}. {Task}. {constraints}"
    "Input: {input} Output:",
    "Act as {a_profession}. {Task} for {audience}, about {topic}. {constraints}",
    "Read the following {doc} and {task}. {input} {constraints}",
    "I will give you {a_doc}. Please {task}, and explain your answer step by step. {constraints}{input}",
    "{Task} about {topic}. {constraints}",
    "Imagine you are {a_profession} talking to {audience}. {Task}. {constraints}",
    "Given the {doc} below, {task}. Answer with only the final result. {doc_label}: {input}",
]
TASKS = [
    "classify its sentiment as positive, negative or neutral",
    "summarize it in {n} sentences",
    "extract every person and place it mentions",
    "write a short title for it",
    "answer the question it raises",
    "rewrite it in a {tone} tone",
    "translate it into {language}",
    "list the main claims it makes",
    "decide whether it is true or false",
    "find the grammatical errors in it and correct them",
    "generate {n} questions a reader might ask about it",
    "identify the main topic of the text",
    "write a reply to it",
    "explain it to a {n} year old child",
    "turn it into a list of {n} bullet points",
    "rate how persuasive it is from 1 to 10",
    "continue the story in the same style",
    "find the sentence that does not belong",
    "write a {form} based on it",
    "identify the tone and the intended audience",
]
CONSTRAINTS = CLAUSES + [
    "Do not repeat the input.",
    "Your answer must be in {language}.",
    "Use at most {n} sentences.",
    "Start your answer with a short summary.",
    "Cite the sentence you rely on.",
    "If the text is ambiguous, say so.",
    "Return the answer as JSON with the keys answer and reason.",
    "Do not use any bullet points.",
    "Write for {audience}.",
    "Mention {topic} at least once.",
    "Keep a {tone} tone throughout.",
    "Avoid the words very, really and just.",
    "End with a question for the reader.",
    "Number each step.",
]
SYNONYMS = {
    "given": ["shown", "provided"],
    "task": ["job", "goal"],
    "write": ["compose", "produce"],
    "short": ["brief", "concise"],
    "explain": ["describe", "justify"],
    "answer": ["response", "reply"],
    "list": ["enumerate", "name"],
    "text": ["passage", "document"],
    "identify": ["find", "determine"],
    "following": ["next", "below"],
    "need": ["have", "are asked"],
    "main": ["key", "central"],
}
LANGUAGES = ["French", "Spanish", "German", "Japanese", "Hindi", "Portuguese", "Swahili", "Korean"]


FUNCTION_WORDS = (
    "the the the a a of of and and to to in is was it for on with as that by at from this be are "
    "his her they we not but or an had has have which their one all there were will would more"
).split()


class _Shaper(_Generator):
    def __init__(self, seed: int):
        super().__init__(seed)
        # Embedded inputs use a Zipf vocabulary of 60,000 made-up words (s = 1.05, as in
        # real text) between function words: a few words are everywhere, most are rare.
        words = sorted({x + y + z for x in SYLLABLES for y in SYLLABLES for z in ["", *SYLLABLES[:36]]})
        self.rng.shuffle(words)
        self.word = _zipf_picker(words[:60_000], self.rng, 1.05)

    def passage_sentence(self) -> str:
        r = self.rng
        words = [r.choice(FUNCTION_WORDS) if r.random() < 0.45 else self.word() for _ in range(r.randint(6, 18))]
        return words[0].capitalize() + " " + " ".join(words[1:]) + "."

    def passage(self, sentences: int) -> str:
        return " ".join(self.passage_sentence() if self.rng.random() < 0.7 else self.sentence() for _ in range(sentences))

    def framed(self) -> tuple[str, dict]:
        r = self.rng
        doc = r.choice(DOCS)
        slots = self.slots()
        slots.update(
            frame=r.choice(FRAMES),
            task_t=r.choice(TASKS),
            doc=doc,
            a_doc=("an " if doc[0] in "aeiou" else "a ") + doc,
            doc_label=doc.capitalize(),
            a_profession="a " + r.choice(PROFESSIONS),
            tone=r.choice(TONES),
            language=r.choice(LANGUAGES),
            input=self.passage(r.choice([1, 1, 2, 2, 3, 4, 6])),
            cons=r.sample(CONSTRAINTS, r.choice([0, 1, 1, 2, 3, 4, 5])),
            numbered=r.random() < 0.4,
        )
        return self.render(slots), slots

    def render(self, s: dict) -> str:
        task = s["task_t"].format(**s)
        cons = [c.format(**s) for c in s["cons"]]
        if s["numbered"] and len(cons) > 1:
            constraints = "Requirements: " + " ".join(f"{i}. {c}" for i, c in enumerate(cons, 1)) + " "
        else:
            constraints = "".join(c + " " for c in cons)
        return " ".join(
            s["frame"].format(**{**s, "task": task, "Task": task[0].upper() + task[1:], "constraints": constraints}).split()
        )

    def swap(self, text: str) -> str:
        words = text.split(" ")
        spots = [i for i, w in enumerate(words) if w.lower().strip(".,?:") in SYNONYMS]
        if spots:
            i = self.rng.choice(spots)
            bare = words[i].strip(".,?:")
            new = self.rng.choice(SYNONYMS[bare.lower()])
            words[i] = words[i].replace(bare, new.capitalize() if bare[0].isupper() else new)
        return " ".join(words)

    def near_copy(self, text: str, slots: dict | None) -> str:
        r = self.rng
        for _ in range(r.choice([1, 1, 2, 2, 3])):
            op = r.random()
            if slots is not None and op < 0.35:
                s = dict(slots)
                if op < 0.12:  # another input under the same frame and task
                    s["input"] = self.passage(r.choice([1, 2, 3]))
                elif op < 0.24:  # a constraint added
                    s["cons"] = s["cons"] + [r.choice(CONSTRAINTS)]
                else:  # a constraint dropped
                    s["cons"] = s["cons"][1:]
                text = self.render(s)
            elif op < 0.55:
                text = self.swap(text)
            elif op < 0.7:  # sentences reordered: the last one first
                parts = text.split(". ")
                if len(parts) > 2:
                    text = ". ".join([parts[-1].rstrip(".")] + parts[:-1]) + "."
            elif op < 0.85:
                words = text.split(" ")
                if len(words) > 4:
                    del words[r.randrange(1, len(words))]
                text = " ".join(words)
            else:
                text = f"{r.choice(PREFIXES)} {text[0].lower()}{text[1:]}"
        return text


def instructions(n: int, seed: int = 0, repeat: float = 0.25, short: float = 0.15) -> list[str]:
    """``n`` instructions: framed and long, some short, about ``repeat`` near-copies of earlier ones."""
    g = _Shaper(seed)
    made: list[tuple[str, dict | None]] = []
    out = []
    for _ in range(n):
        r = g.rng.random()
        if made and r < repeat:
            back = min(len(made), int(g.rng.expovariate(1 / 200)) + 1)
            text, slots = made[-back] if g.rng.random() < 0.8 else g.rng.choice(made)
            text = g.near_copy(text, slots)
        elif r < repeat + short:
            text, slots = g.paraphrase(*g.fresh()) if g.rng.random() < 0.2 else g.fresh()[0], None
        else:
            text, slots = g.framed()
        made.append((text, slots))
        if len(made) > 100_000:  # bound memory for the 1M set
            del made[:50_000]
        out.append(text)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("n", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jsonl", action="store_true", help="one {instruction} object per line")
    a = p.parse_args()
    for text in instructions(a.n, a.seed):
        print(json.dumps({"instruction": text}) if a.jsonl else text)


if __name__ == "__main__":
    main()
