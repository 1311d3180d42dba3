"""Write the small English-French sample under data/ (sentences from a hand-written grammar).

    python data/make_parallel_sample.py

The grammar and its translations were written for rnnkit; the output is deterministic.
"""
from __future__ import annotations

import random
from pathlib import Path

# (english, french, plural?, gender of the french noun)
SUBJECTS = [
    ("a man", "un homme", False, "m"), ("a woman", "une femme", False, "f"),
    ("a boy", "un garçon", False, "m"), ("a girl", "une fille", False, "f"),
    ("a dog", "un chien", False, "m"), ("the old fisherman", "le vieux pêcheur", False, "m"),
    ("two men", "deux hommes", True, "m"), ("two women", "deux femmes", True, "f"),
    ("the children", "les enfants", True, "m"), ("three dogs", "trois chiens", True, "m"),
    ("a young baker", "un jeune boulanger", False, "m"), ("the musicians", "les musiciens", True, "m"),
]
# (english singular, english plural, french singular, french plural)
VERBS = [
    ("is walking", "are walking", "marche", "marchent"),
    ("is running", "are running", "court", "courent"),
    ("is sitting", "are sitting", "est assis", "sont assis"),
    ("is playing", "are playing", "joue", "jouent"),
    ("is waiting", "are waiting", "attend", "attendent"),
    ("is sleeping", "are sleeping", "dort", "dorment"),
    ("is singing", "are singing", "chante", "chantent"),
    ("is eating", "are eating", "mange", "mangent"),
]
PLACES = [
    ("in the park", "dans le parc"), ("on the beach", "sur la plage"),
    ("near the river", "près de la rivière"), ("in the street", "dans la rue"),
    ("under a tree", "sous un arbre"), ("in the snow", "dans la neige"),
    ("on a bench", "sur un banc"), ("by the harbour", "près du port"),
    ("in the kitchen", "dans la cuisine"), ("at the market", "au marché"),
]
TIMES = [("", ""), (" at night", " la nuit"), (" in the morning", " le matin"), (" today", " aujourd'hui")]


def sentence(rng: random.Random) -> tuple[str, str]:
    en_s, fr_s, plural, gender = rng.choice(SUBJECTS)
    v = rng.choice(VERBS)
    if v[2] == "est assis" and gender == "f":   # French past participles agree with the subject
        v = (v[0], v[1], "est assise", "sont assises")
    en_p, fr_p = rng.choice(PLACES)
    en_t, fr_t = rng.choice(TIMES)
    en = f"{en_s} {v[1] if plural else v[0]} {en_p}{en_t} ."
    fr = f"{fr_s} {v[3] if plural else v[2]} {fr_p}{fr_t} ."
    return en[0].upper() + en[1:], fr[0].upper() + fr[1:]


def main() -> None:
    rng = random.Random(2026)
    pairs = sorted({sentence(rng) for _ in range(20000)})
    rng.shuffle(pairs)
    out = Path(__file__).resolve().parent / "parallel"
    out.mkdir(exist_ok=True)
    splits = {"train": pairs[:1600], "valid": pairs[1600:1700], "test": pairs[1700:1800]}
    for name, part in splits.items():
        (out / f"{name}.en").write_text("".join(e + "\n" for e, _ in part), encoding="utf-8")
        (out / f"{name}.fr").write_text("".join(f + "\n" for _, f in part), encoding="utf-8")
        print(f"{name}: {len(part)} pairs")


if __name__ == "__main__":
    main()
