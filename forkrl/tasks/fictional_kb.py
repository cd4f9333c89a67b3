"""A knowledge base of fictional people, companies, cities and countries, with two-hop questions.

No model has memorised these facts, so a question is answerable only by searching the corpus (one
passage per entity). Deterministic in the seed; the shipped files come from

    python -m forkrl.tasks.fictional_kb data/fictional_kb

which writes corpus.jsonl ({id, title, text}), train.jsonl and eval.jsonl ({prompt, answer}; the
eval questions ask about entities no training question mentions), and experts_train.jsonl and
experts_eval.jsonl: the same questions with an expert's steps (UI-S1's semi-online RL, §18), and
router_train.jsonl and router_eval.jsonl: one-hop questions, one per passage (Router-R1, §20).
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
        c, f, e, city = company["name"], founder["name"], employee["name"], company["city"]["name"]
        # hops: what an expert searches (query, the entity it must name, the passage it reads) and thinks
        if kind == 0:
            q, a = f"In which city was the founder of {c} born?", founder["born"]
            hops = [(f"{c} founder", c, c, f"I need the founder of {c}."),
                    (f"{f} born", f, f, f"{c} was founded by {f}. Now where {f} was born.")]
        elif kind == 1:
            q, a = f"In which country is the headquarters of {c}?", company["city"]["country"]
            hops = [(f"{c} headquarters", c, c, f"I need the headquarters of {c}."),
                    (f"{city} country", city, city, f"{c} has its headquarters in {city}. Now its country.")]
        else:
            q, a = f"Who founded the company that {e} works for?", founder["name"]
            hops = [(f"{e} works for", e, e, f"I need the company {e} works for."),
                    (f"{c} founder", c, c, f"{e} works for {c}. Now who founded {c}.")]
        questions.append({"prompt": q, "answer": a, "company": company["name"], "hops": hops})
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


def expert_trajectory(question: dict, corpus: list[dict]) -> list[dict]:
    """UI-S1's expert steps for a question (algorithms.md §18): a thought, an action and the
    observation the action returns, per step: two searches (each must name its entity, `key`) and
    the answer."""
    passages = {d["title"]: f"[1] {d['title']}: {d['text']}" for d in corpus}
    steps = [{"thought": thought, "action": {"type": "search", "arg": query, "key": key},
              "observation": passages[title]} for query, key, title, thought in question["hops"]]
    steps.append({"thought": f"The answer is {question['answer']}.",
                  "action": {"type": "answer", "arg": question["answer"], "key": question["answer"]},
                  "observation": ""})
    return steps


def one_hop_questions(corpus: list[dict]) -> list[dict]:
    """One question per passage that a single lookup answers (Router-R1's routing task): where a
    person was born, who founded a company, the country a city is in."""
    out = []
    for d in corpus:
        kind, name = d["id"].split("/", 1)
        text = d["text"]
        if kind == "person":
            city = text.split(" was born in ")[1].split(" and ")[0].rstrip(".")
            out.append({"prompt": f"In which city was {name} born?", "answer": city})
        elif kind == "company":
            founder = text.split(" by ")[1].split(" and ")[0]
            out.append({"prompt": f"Who founded {name}?", "answer": founder})
        else:
            out.append({"prompt": f"In which country is {name}?", "answer": text.split(" is a city in ")[1].rstrip(".")})
    return out


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
        (out / f"experts_{split}.jsonl").write_text("".join(
            json.dumps({"prompt": r["prompt"], "answer": r["answer"], "steps": expert_trajectory(r, corpus)}) + "\n"
            for r in rows))
    one_hop = one_hop_questions(corpus)  # the corpus is shuffled: a prefix is a random held-out set
    n_eval = int(len(one_hop) * eval_share)
    for split, rows in (("eval", one_hop[:n_eval]), ("train", one_hop[n_eval:])):
        (out / f"router_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else "data/fictional_kb")
