"""Multi-Toy: a small synthetic multilingual text-video benchmark.

Each video is a sequence of 1-3 events, each an (action, object, place) triple
drawn from 12 actions, 16 objects and 8 places. Every concept has a fixed random
unit vector in R^512; a frame of an event is the normalised, randomly weighted
mix of its three concept vectors plus a per-video style vector and Gaussian
noise, with a few background frames between events, so events can be located in
time (8-24 frames per video). Captions come from per-language templates and a
hand-written lexicon of real words in nine languages (en, de, fr, cs, zh, ru,
vi, sw, es) and describe one event, or two events joined by "then". English
captions are exact; every other language is a simulated machine translation in
which each content word is dropped or replaced by another word of the same type
at a language-specific error rate (10% for German up to 35% for Swahili), so
English text is the cleanest view of a video, as in Multi-MSRVTT.

Besides the multilingual training, validation and test splits, an English-rich training file holds
the training videos followed by many more videos captioned in English only: English video-text
data is abundant in the real world, and the toy teachers learn from this file the English that the
paper's teachers bring from large English pretraining. Choices of epochs and hyper-parameters are
made on the validation split; the test split is for the final tables.
"""
import argparse
import json
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np

from data_loader.safe_pickle import DataFileError
from common.files import atomic_write

VERSION = 2
KINDS = ("action", "object", "place")

# Concept keys, stored in the `events` annotations; the lexicon lists below are
# aligned with them by index.
CONCEPTS = {
    "action": ("cut", "wash", "open", "hold", "throw", "carry", "paint", "clean",
               "drop", "push", "kick", "fold"),
    "object": ("onion", "cup", "box", "ball", "book", "shirt", "bottle", "chair",
               "knife", "apple", "bag", "towel", "plate", "hat", "key", "carrot"),
    "place": ("kitchen", "garden", "office", "street", "park", "bedroom", "beach",
              "classroom"),
}

# Probability that a content word of a translated caption is corrupted (half of
# the time dropped, half of the time swapped for another word of the same type).
# Low-resource languages get worse "machine translation".
ERROR_RATES = {"en": 0.0, "de": 0.10, "fr": 0.12, "es": 0.12, "cs": 0.20,
               "ru": 0.20, "zh": 0.25, "vi": 0.25, "sw": 0.35}

# Per language: surface forms of each concept (verbs in 3rd person, objects as
# direct objects, places as locative phrases), 5 caption templates (template i
# of every language translates English template i), the connective that joins a
# second event, the clause used for that event, and the sentence end.
# Grammar is simplified; every word is a real word of its language.
LEXICON = {
    "en": {
        "action": ["cuts", "washes", "opens", "holds", "throws", "carries", "paints",
                   "cleans", "drops", "pushes", "kicks", "folds"],
        "object": ["an onion", "a cup", "a box", "a ball", "a book", "a shirt",
                   "a bottle", "a chair", "a knife", "an apple", "a bag", "a towel",
                   "a plate", "a hat", "a key", "a carrot"],
        "place": ["in the kitchen", "in the garden", "in the office", "on the street",
                  "in the park", "in the bedroom", "on the beach", "in the classroom"],
        "templates": ["a person {a} {o} {p}", "someone {a} {o} {p}", "{p}, a man {a} {o}",
                      "a woman {a} {o} {p}", "a video where a child {a} {o} {p}"],
        "then": ", then ", "clause": "{a} {o} {p}", "end": ".",
    },
    "de": {
        "action": ["schneidet", "wäscht", "öffnet", "hält", "wirft", "trägt", "bemalt",
                   "putzt", "lässt fallen", "schiebt", "tritt", "faltet"],
        "object": ["eine Zwiebel", "eine Tasse", "eine Kiste", "einen Ball", "ein Buch",
                   "ein Hemd", "eine Flasche", "einen Stuhl", "ein Messer", "einen Apfel",
                   "eine Tasche", "ein Handtuch", "einen Teller", "einen Hut",
                   "einen Schlüssel", "eine Karotte"],
        "place": ["in der Küche", "im Garten", "im Büro", "auf der Straße", "im Park",
                  "im Schlafzimmer", "am Strand", "im Klassenzimmer"],
        "templates": ["eine Person {a} {o} {p}", "jemand {a} {o} {p}", "{p} {a} ein Mann {o}",
                      "eine Frau {a} {o} {p}", "ein Video, in dem ein Kind {o} {p} {a}"],
        "then": ", dann ", "clause": "{a} {o} {p}", "end": ".",
    },
    "fr": {
        "action": ["coupe", "lave", "ouvre", "tient", "lance", "porte", "peint",
                   "nettoie", "laisse tomber", "pousse", "frappe", "plie"],
        "object": ["un oignon", "une tasse", "une boîte", "un ballon", "un livre",
                   "une chemise", "une bouteille", "une chaise", "un couteau", "une pomme",
                   "un sac", "une serviette", "une assiette", "un chapeau", "une clé",
                   "une carotte"],
        "place": ["dans la cuisine", "dans le jardin", "au bureau", "dans la rue", "au parc",
                  "dans la chambre", "à la plage", "dans la salle de classe"],
        "templates": ["une personne {a} {o} {p}", "quelqu'un {a} {o} {p}",
                      "{p}, un homme {a} {o}", "une femme {a} {o} {p}",
                      "une vidéo où un enfant {a} {o} {p}"],
        "then": ", puis ", "clause": "{a} {o} {p}", "end": ".",
    },
    "cs": {
        "action": ["krájí", "myje", "otevírá", "drží", "hází", "nese", "maluje", "čistí",
                   "upouští", "tlačí", "kope", "skládá"],
        "object": ["cibuli", "hrnek", "krabici", "míč", "knihu", "košili", "láhev", "židli",
                   "nůž", "jablko", "tašku", "ručník", "talíř", "klobouk", "klíč", "mrkev"],
        "place": ["v kuchyni", "na zahradě", "v kanceláři", "na ulici", "v parku",
                  "v ložnici", "na pláži", "ve třídě"],
        "templates": ["člověk {a} {o} {p}", "někdo {a} {o} {p}", "{p} muž {a} {o}",
                      "žena {a} {o} {p}", "video, kde dítě {a} {o} {p}"],
        "then": ", potom ", "clause": "{a} {o} {p}", "end": ".",
    },
    "zh": {
        "action": ["切", "洗", "打开", "拿着", "扔", "搬", "画", "擦", "丢下", "推", "踢", "叠"],
        "object": ["洋葱", "杯子", "盒子", "球", "书", "衬衫", "瓶子", "椅子", "刀", "苹果",
                   "包", "毛巾", "盘子", "帽子", "钥匙", "胡萝卜"],
        "place": ["在厨房里", "在花园里", "在办公室里", "在街上", "在公园里", "在卧室里",
                  "在海滩上", "在教室里"],
        "templates": ["一个人{p}{a}{o}", "有人{p}{a}{o}", "{p}，一名男子{a}{o}",
                      "一位女士{p}{a}{o}", "视频中一个孩子{p}{a}{o}"],
        "then": "，然后", "clause": "{p}{a}{o}", "end": "。",
    },
    "ru": {
        "action": ["режет", "моет", "открывает", "держит", "бросает", "несёт", "красит",
                   "чистит", "роняет", "толкает", "пинает", "складывает"],
        "object": ["лук", "чашку", "коробку", "мяч", "книгу", "рубашку", "бутылку", "стул",
                   "нож", "яблоко", "сумку", "полотенце", "тарелку", "шляпу", "ключ",
                   "морковь"],
        "place": ["на кухне", "в саду", "в офисе", "на улице", "в парке", "в спальне",
                  "на пляже", "в классе"],
        "templates": ["человек {a} {o} {p}", "кто-то {a} {o} {p}", "{p} мужчина {a} {o}",
                      "женщина {a} {o} {p}", "видео, где ребёнок {a} {o} {p}"],
        "then": ", затем ", "clause": "{a} {o} {p}", "end": ".",
    },
    "vi": {
        "action": ["cắt", "rửa", "mở", "cầm", "ném", "mang", "sơn", "lau", "đánh rơi",
                   "đẩy", "đá", "gấp"],
        "object": ["củ hành", "cái cốc", "cái hộp", "quả bóng", "quyển sách",
                   "cái áo sơ mi", "cái chai", "cái ghế", "con dao", "quả táo", "cái túi",
                   "cái khăn", "cái đĩa", "cái mũ", "chìa khóa", "củ cà rốt"],
        "place": ["trong nhà bếp", "trong vườn", "trong văn phòng", "trên đường phố",
                  "trong công viên", "trong phòng ngủ", "trên bãi biển", "trong lớp học"],
        "templates": ["một người {a} {o} {p}", "có người {a} {o} {p}",
                      "{p}, một người đàn ông {a} {o}", "một người phụ nữ {a} {o} {p}",
                      "video có một đứa trẻ {a} {o} {p}"],
        "then": ", sau đó ", "clause": "{a} {o} {p}", "end": ".",
    },
    "sw": {
        "action": ["anakata", "anaosha", "anafungua", "anashika", "anatupa", "anabeba",
                   "anapaka rangi", "anasafisha", "anadondosha", "anasukuma",
                   "anapiga teke", "anakunja"],
        "object": ["kitunguu", "kikombe", "sanduku", "mpira", "kitabu", "shati", "chupa",
                   "kiti", "kisu", "tufaha", "mfuko", "taulo", "sahani", "kofia", "ufunguo",
                   "karoti"],
        "place": ["jikoni", "shambani", "ofisini", "barabarani", "bustanini", "chumbani",
                  "ufukweni", "darasani"],
        "templates": ["mtu {a} {o} {p}", "mtu mmoja {a} {o} {p}", "{p}, mwanamume {a} {o}",
                      "mwanamke {a} {o} {p}", "video ambapo mtoto {a} {o} {p}"],
        "then": ", kisha ", "clause": "{a} {o} {p}", "end": ".",
    },
    "es": {
        "action": ["corta", "lava", "abre", "sostiene", "lanza", "lleva", "pinta", "limpia",
                   "deja caer", "empuja", "patea", "dobla"],
        "object": ["una cebolla", "una taza", "una caja", "una pelota", "un libro",
                   "una camisa", "una botella", "una silla", "un cuchillo", "una manzana",
                   "una bolsa", "una toalla", "un plato", "un sombrero", "una llave",
                   "una zanahoria"],
        "place": ["en la cocina", "en el jardín", "en la oficina", "en la calle",
                  "en el parque", "en el dormitorio", "en la playa", "en el aula"],
        "templates": ["una persona {a} {o} {p}", "alguien {a} {o} {p}",
                      "{p}, un hombre {a} {o}", "una mujer {a} {o} {p}",
                      "un vídeo donde un niño {a} {o} {p}"],
        "then": ", luego ", "clause": "{a} {o} {p}", "end": ".",
    },
}
N_TEMPLATES = 5
# Videos of the English-rich training file of the embedded benchmark: ten times the multilingual
# training set, enough for a toy teacher to know English better than a student can learn the other
# languages from the multilingual set.
N_ENGLISH = 10000


def languages():
    """The languages of the lexicon, English first."""
    return tuple(LEXICON)


def _pattern(word, lang):
    # Chinese has no spaces, so match substrings; elsewhere whole words only.
    if lang == "zh":
        return re.compile(re.escape(word))
    return re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)", re.IGNORECASE)


_PATTERNS = {lang: [(kind, i, _pattern(w, lang)) for kind in KINDS
                    for i, w in enumerate(lex[kind])] for lang, lex in LEXICON.items()}


def mentions(text, lang):
    """Counter of (kind, concept index) mentioned in a caption of `lang`."""
    found = Counter()
    for kind, i, pat in _PATTERNS[lang]:
        n = len(pat.findall(text))
        if n:
            found[(kind, i)] = n
    return found


def render(lang, template, events, rng=None):
    """Caption in `lang` of 1 or 2 events (each an (action, object, place) index
    triple) with template `template`. With `rng`, content words are corrupted
    at ERROR_RATES[lang]; without, the translation is clean."""
    lex = LEXICON[lang]
    rate = ERROR_RATES[lang] if rng is not None else 0.0

    def word(kind, idx):
        if rate == 0.0 or rng.random() >= rate:
            return lex[kind][idx]
        if rng.random() < 0.5:
            return ""  # dropped
        other = int(rng.integers(len(lex[kind]) - 1))
        return lex[kind][other + (other >= idx)]  # swapped for a different word

    def fill(fmt, event):
        a, o, p = event
        return fmt.format(a=word("action", a), o=word("object", o), p=word("place", p))

    text = fill(lex["templates"][template], events[0])
    if len(events) > 1:
        text += lex["then"] + fill(lex["clause"], events[1])
    # Tidy the gaps that dropped words leave behind.
    text = re.sub(r" {2,}", " ", text)
    text = re.sub(r" ([,，])", r"\1", text).strip(" ,，")
    return text[:1].upper() + text[1:] + lex["end"]


def _concept_vectors(seed, dim):
    rng = np.random.default_rng([seed, 0])
    vecs = {}
    for kind in KINDS:
        v = rng.standard_normal((len(CONCEPTS[kind]), dim))
        vecs[kind] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return vecs


def _unit(v):
    return v / np.linalg.norm(v)


# Event duration range (frames, upper bound exclusive) by number of events,
# chosen so that videos have between 8 and 24 frames.
_DURATION = {1: (8, 13), 2: (4, 9), 3: (3, 6)}


def _video(rng, vecs, dim):
    """Sample events and their frame features: (events, features [T, dim])."""
    n = int(rng.integers(1, 4))
    scene = int(rng.integers(len(CONCEPTS["place"])))
    events = []
    while len(events) < n:
        # Events of one video usually happen in the same place.
        place = scene if rng.random() < 0.6 else int(rng.integers(len(CONCEPTS["place"])))
        ev = (int(rng.integers(len(CONCEPTS["action"]))),
              int(rng.integers(len(CONCEPTS["object"]))), place)
        if not events or ev != events[-1]:
            events.append(ev)
    weights = rng.dirichlet([3.0, 3.0, 3.0])  # how visible action/object/place are
    style = 0.3 * _unit(rng.standard_normal(dim))  # camera, lighting, ...
    sigma = 0.6 / np.sqrt(dim)  # noise norm ~0.6 against a unit signal
    frames, spans = [], []

    def background(k):
        frames.extend(style + 0.5 * _unit(rng.standard_normal(dim)) for _ in range(k))

    for a, o, p in events:
        background(int(rng.integers(0, 3)))
        mean = _unit(weights[0] * vecs["action"][a] + weights[1] * vecs["object"][o]
                     + weights[2] * vecs["place"][p])
        start = len(frames)
        dur = int(rng.integers(*_DURATION[n]))
        frames.extend(mean + style + sigma * rng.standard_normal(dim) for _ in range(dur))
        spans.append((start, len(frames)))
    background(int(rng.integers(0, 3)))
    return events, spans, np.stack(frames).astype(np.float32)


def _event_dicts(events, spans):
    return [{"start": s, "end": e,
             "action": CONCEPTS["action"][a], "object": CONCEPTS["object"][o],
             "place": CONCEPTS["place"][p], "caption_en": render("en", 0, [(a, o, p)])}
            for (a, o, p), (s, e) in zip(events, spans)]


def _train_item(vid, rng, vecs, dim, n_captions, langs=tuple(LEXICON)):
    events, spans, feats = _video(rng, vecs, dim)
    # Captions cycle through the possible descriptions (single events, then
    # consecutive pairs) in random order, each with a different template.
    subsets = [(i,) for i in range(len(events))] + [(i, i + 1) for i in range(len(events) - 1)]
    order = rng.permutation(len(subsets))
    templates = rng.permutation(N_TEMPLATES)
    specs = [(int(templates[k % N_TEMPLATES]), subsets[order[k % len(subsets)]])
             for k in range(n_captions)]
    item = {"id": vid, "2d": feats}
    for lang in langs:
        item[f"caption_{lang}"] = [render(lang, t, [events[i] for i in sub], rng)
                                   for t, sub in specs]
    item["events"] = _event_dicts(events, spans)
    return item


def _test_item(vid, rng, vecs, dim, seen):
    # Resample until the described events differ from every earlier test video,
    # so that each test caption identifies one video.
    for _ in range(100):
        events, spans, feats = _video(rng, vecs, dim)
        start = int(rng.integers(len(events) - 1)) if len(events) > 1 else 0
        described = tuple(events[start:start + 2])
        if described not in seen:
            break
    else:
        raise DataFileError(f"test video {vid}: no new events in 100 draws; the toy lexicon cannot give this many "
                            "test videos distinct descriptions (lower n_test)")
    seen.add(described)
    template = int(rng.integers(N_TEMPLATES))
    item = {"id": vid, "2d": feats}
    for lang in LEXICON:
        item[f"eval_caption_{lang}"] = render(lang, template, list(described), rng)
    item["events"] = _event_dicts(events, spans)
    return item


def _eval_items(first_id, n, rng, vecs, dim):
    seen = set()
    return [_test_item(f"toy{first_id + i:05d}", rng, vecs, dim, seen) for i in range(n)]


def generate(out_dir, seed=0, n_train=1000, n_test=200, n_val=200, n_english=0, feature_dim=512,
             captions_per_video=5):
    """Write multi_toy_{train,val,test}.pkl and manifest.json to `out_dir`, and with `n_english` >
    `n_train` the English-rich training file multi_toy_train_english.pkl: the `n_train` training
    items followed by `n_english - n_train` videos captioned in English only. Files generated with
    the same parameters are reused. Every split has its own random stream, so adding the validation
    or English-rich split leaves the training and test items as they were. Returns the paths."""
    out_dir = Path(out_dir)
    paths = {"train": out_dir / "multi_toy_train.pkl", "val": out_dir / "multi_toy_val.pkl",
             "test": out_dir / "multi_toy_test.pkl"}
    if n_english > n_train:
        paths["english"] = out_dir / "multi_toy_train_english.pkl"
    params = {"version": VERSION, "seed": seed, "n_train": n_train, "n_test": n_test, "n_val": n_val,
              "n_english": n_english, "feature_dim": feature_dim, "captions_per_video": captions_per_video}
    manifest = out_dir / "manifest.json"
    try:
        if (json.loads(manifest.read_text()) == params
                and all(p.exists() for p in paths.values())):
            return paths
    except (OSError, ValueError):
        pass

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # invalid until both splits are rewritten
    vecs = _concept_vectors(seed, feature_dim)
    rng = np.random.default_rng([seed, 1])
    train = [_train_item(f"toy{i:05d}", rng, vecs, feature_dim, captions_per_video)
             for i in range(n_train)]
    splits = {"train": train,
              "test": _eval_items(n_train, n_test, np.random.default_rng([seed, 2]), vecs, feature_dim),
              "val": _eval_items(n_train + n_test, n_val, np.random.default_rng([seed, 3]), vecs, feature_dim)}
    if "english" in paths:
        rng, first = np.random.default_rng([seed, 4]), n_train + n_test + n_val
        splits["english"] = train + [_train_item(f"toy{first + i:05d}", rng, vecs, feature_dim, captions_per_video,
                                                 langs=("en",)) for i in range(n_english - n_train)]
    for split, items in splits.items():
        atomic_write(paths[split], lambda f: pickle.dump(items, f, protocol=4))
    # The manifest goes last: it is only valid once every split exists.
    atomic_write(manifest, lambda f: f.write((json.dumps(params, indent=2) + "\n").encode()))
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate the Multi-Toy benchmark.")
    parser.add_argument("--out", default="cache/multi_toy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--n-english", type=int, default=N_ENGLISH,
                        help="videos of the English-rich training file, the training videos included")
    args = parser.parse_args(argv)
    paths = generate(args.out, seed=args.seed, n_train=args.n_train, n_test=args.n_test, n_val=args.n_val,
                     n_english=args.n_english)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
