"""A knowledge base of fictional people, companies, cities and countries, with two-hop questions.

No model has memorised these facts, so a question is answerable only by searching the corpus (one
passage per entity). Deterministic in the seed; the shipped files come from

    python -m forkrl.tasks.fictional_kb data/fictional_kb

which writes corpus.jsonl ({id, title, text}), train.jsonl and eval.jsonl ({prompt, answer}; the
eval questions ask about entities no training question mentions).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "tr", "st", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io"]
_CODAS = ["", "n", "r", "l", "s", "th", "nd", "rk", "x"]
_PRODUCTS = ["lanterns", "clocks", "bicycles", "ink", "rope", "violins", "maps", "kettles", "telescopes", "soap"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def generate(seed: int = 0, n_companies: int = 160) -> tuple[list[dict], list[dict]]:
    """(corpus passages, questions). Every name is unique; each question needs two passages."""
    rng = random.Random(seed)
    used: set[str] = set()

    def name(syllables: int) -> str:
        while True:
            w = _word(rng, syllables)
            if w not in used:
                used.add(w)
                return w

    countries = [name(3) for _ in range(12)]
    cities = [{"name": name(2) + rng.choice(["ford", "holm", "vale", "port", "wick"]), "country": rng.choice(countries)}
              for _ in range(40)]
    companies, people, questions = [], [], []
    for i in range(n_companies):
        founder = {"name": f"{name(2)} {name(2)}", "born": rng.choice(cities)["name"]}
        company = {"name": f"{name(2)} {rng.choice(['Works', 'Company', 'Guild', 'Foundry', 'Mills'])}",
                   "founder": founder["name"], "city": rng.choice(cities), "product": rng.choice(_PRODUCTS),
                   "year": rng.randint(1820, 1990)}
        employee = {"name": f"{name(2)} {name(2)}", "works_at": company["name"], "born": rng.choice(cities)["name"]}
        people += [founder, employee]
        companies.append(company)
        kind = i % 3
        if kind == 0:
            q, a = f"In which city was the founder of {company['name']} born?", founder["born"]
        elif kind == 1:
            q, a = f"In which country is the headquarters of {company['name']}?", company["city"]["country"]
        else:
            q, a = f"Who founded the company that {employee['name']} works for?", founder["name"]
        questions.append({"prompt": q, "answer": a, "company": company["name"]})
    corpus = []
    for c in companies:
        corpus.append({"id": f"company/{c['name']}", "title": c["name"],
                       "text": f"{c['name']} makes {c['product']}. It was founded in {c['year']} by {c['founder']} "
                               f"and has its headquarters in {c['city']['name']}."})
    for p in people:
        if "works_at" in p:
            text = f"{p['name']} was born in {p['born']} and works for {p['works_at']}."
        else:
            text = f"{p['name']} was born in {p['born']}."
        corpus.append({"id": f"person/{p['name']}", "title": p["name"], "text": text})
    for city in {c["name"]: c for c in cities}.values():
        corpus.append({"id": f"city/{city['name']}", "title": city["name"],
                       "text": f"{city['name']} is a city in {city['country']}."})
    rng.shuffle(corpus)
    return corpus, questions


def write(out_dir: str | Path, seed: int = 0, eval_share: float = 0.2) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus, questions = generate(seed)
    n_eval = int(len(questions) * eval_share)
    splits = {"eval": questions[:n_eval], "train": questions[n_eval:]}
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    for split, rows in splits.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n"
                                                   for r in rows))


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else "data/fictional_kb")
