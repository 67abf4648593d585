"""Machine-translate the English captions of safe-layout splits into other languages.

    python -m data_loader.translate data/mine/train data/mine/eval --languages de fr \\
        --model "Helsinki-NLP/opus-mt-en-{lang}"                     # one Marian model per language
    python -m data_loader.translate data/mine/train data/mine/eval --languages de fr \\
        --model facebook/m2m100_418M                                 # one many-to-many model
    python -m data_loader.translate data/mine/train --languages de --model facebook/nllb-200-distilled-600M \\
        --source-code eng_Latn --lang-code de=deu_Latn

A model name holding ``{lang}`` names one model per target language; any other name is one
many-to-many model told the target language by its language token (``__de__`` as in M2M100, or
the code given with --lang-code, as NLLB's ``deu_Latn``). Both are loaded with AutoTokenizer and
AutoModelForSeq2SeqLM, by hub id or folder, and run in batches (on the GPU when there is one).

Each translation is stored in a cache (SQLite) under (model, target language, decoding settings
and language codes, English text), committed batch by batch: a re-run, an interrupted run,
another split or a new language translates only what the cache lacks. The captions of a new
language are written into each split's ``captions.json`` (caption k of an item translates English
caption k), and ``translations`` there records the model, settings and codes that produced each
language; train.py reads them as any other language.
"""
import argparse
import json
import sqlite3
import sys
from pathlib import Path

from data_loader.corpus import ENGLISH, safe_files
from data_loader.safe_pickle import DataFileError
from common.errors import UserError, first_line, run_command
from common.files import atomic_write
from common.hub import load_named, model_identity


class TranslatorError(UserError, ValueError):
    """A translation model cannot be loaded or cannot be told a target language."""


class Seq2Seq:
    """A Hugging Face sequence-to-sequence model and its tokenizer, by hub id or folder."""

    def __init__(self, name, device):
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        self.tokenizer, self.model = load_named("translation model", name, lambda **options: (
            AutoTokenizer.from_pretrained(name, **options),
            AutoModelForSeq2SeqLM.from_pretrained(name, dtype=torch.float32, **options).to(device).eval()),
            TranslatorError)
        self.device = device

    def language_token(self, code):
        """The id of the token that names language ``code`` (``code`` itself or ``__code__``), or None."""
        unk = self.tokenizer.unk_token_id
        for token in (code, f"__{code}__"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id != unk:
                return token_id
        return None

    def generate(self, texts, decoding, forced_bos=None):
        import torch
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        extra = {} if forced_bos is None else {"forced_bos_token_id": forced_bos}
        with torch.inference_mode():
            out = self.model.generate(**inputs, num_beams=decoding["num_beams"],
                                      max_new_tokens=decoding["max_new_tokens"], **extra)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class PerLanguageModels:
    """One model per target language: the name with ``{lang}`` replaced (Marian's opus-mt-en-<lang>)."""

    def __init__(self, template, device, **_):
        self.template, self.device = template, device

    def model_name(self, lang):
        return self.template.format(lang=lang)

    @staticmethod
    def settings(lang):
        return {}  # the model itself names the language pair

    def translator(self, lang):
        model = Seq2Seq(self.model_name(lang), self.device)
        return lambda texts, decoding: model.generate(texts, decoding)


class ManyToManyModel:
    """One model for every target language, told the language by forcing its token first."""

    def __init__(self, name, device, lang_codes, source_code):
        self.name, self.device, self.lang_codes, self.source_code = name, device, lang_codes, source_code
        self.model = None

    def model_name(self, lang):
        return self.name

    def settings(self, lang):
        """The codes the model is told: part of what a translation depends on."""
        return {"source_code": self.source_code, "target_code": self.lang_codes.get(lang, lang)}

    def translator(self, lang):
        if self.model is None:
            self.model = Seq2Seq(self.name, self.device)
            if hasattr(self.model.tokenizer, "src_lang"):  # M2M100 and NLLB tokenizers mark the source language
                self.model.tokenizer.src_lang = self.source_code
        code = self.lang_codes.get(lang, lang)
        token = self.model.language_token(code)
        if token is None:
            raise TranslatorError(f"translation model '{self.name}' has no language token for '{lang}' (tried "
                                  f"'{code}' and '__{code}__'); name it with --lang-code {lang}=CODE")
        return lambda texts, decoding: self.model.generate(texts, decoding, forced_bos=token)


def build_translators(model, device, lang_codes, source_code):
    if "{lang}" in model:
        return PerLanguageModels(model, device)
    return ManyToManyModel(model, device, lang_codes, source_code)


class TranslationCache:
    """Translations by (model, target language, settings, English text), in SQLite; the settings
    (decoding, language codes) are one JSON text in the ``decoding`` column."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path)
            self.db.execute("CREATE TABLE IF NOT EXISTS translation (model TEXT, lang TEXT, decoding TEXT, "
                            "source TEXT, target TEXT, PRIMARY KEY (model, lang, decoding, source))")
        except sqlite3.DatabaseError as e:
            raise DataFileError(f"{self.path}: not a usable translation cache ({first_line(e)})") from None

    def get(self, model, lang, decoding, texts):
        found = {}
        rows = self.db.execute("SELECT source, target FROM translation WHERE model = ? AND lang = ? AND decoding = ?",
                               (model, lang, decoding))
        wanted = set(texts)
        for source, target in rows:
            if source in wanted:
                found[source] = target
        return found

    def put(self, model, lang, decoding, pairs):
        with self.db:  # one transaction: a batch is stored whole or not at all
            self.db.executemany("INSERT OR REPLACE INTO translation VALUES (?, ?, ?, ?, ?)",
                                [(model, lang, decoding, s, t) for s, t in pairs])


def read_split(folder):
    files = safe_files(folder)
    try:
        meta = json.loads(files.captions.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataFileError(f"{files.captions}: cannot read ({first_line(e)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("captions"), dict) or ENGLISH not in meta["captions"]:
        raise DataFileError(f"{files.captions}: no English ('{ENGLISH}') captions to translate")
    return files.captions, meta


def translate(args):
    import torch
    from tqdm import tqdm
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lang_codes = {}
    for pair in args.lang_code:
        lang, sep, code = pair.partition("=")
        if not sep or not lang or not code:
            raise DataFileError(f"--lang-code '{pair}': expected LANG=CODE, e.g. de=deu_Latn")
        lang_codes[lang] = code
    if ENGLISH in args.languages:
        raise DataFileError(f"--languages: '{ENGLISH}' is the source language")
    splits = [read_split(folder) for folder in args.splits]
    cache = TranslationCache(args.cache or Path(args.splits[0]).resolve().parent / "translation_cache.sqlite")
    translators = build_translators(args.model, device, lang_codes, args.source_code)
    decoding = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    for lang in args.languages:
        model = model_identity(translators.model_name(lang))
        settings = {**decoding, **translators.settings(lang)}
        settings_key = json.dumps(settings, sort_keys=True)
        record = {"model": model, "from": ENGLISH, **settings}
        todo = []
        for path, meta in splits:
            previous = meta.get("translations", {}).get(lang)
            if lang in meta["captions"] and previous != record and not args.overwrite:
                by = f"model {previous['model']}" if previous else "no recorded model (given captions)"
                raise DataFileError(f"{path}: already holds '{lang}' captions, from {by}; pass --overwrite to "
                                    "replace them")
            if previous != record or lang not in meta["captions"]:
                todo.append((path, meta))
        if not todo:
            print(f"{lang}: up to date ({model})")
            continue
        texts = list(dict.fromkeys(c for _, meta in todo for item in meta["captions"][ENGLISH] for c in item))
        known = cache.get(model, lang, settings_key, texts)
        missing = sorted((t for t in texts if t not in known), key=len)  # similar lengths pad less
        if missing:
            run = translators.translator(lang)
            for start in tqdm(range(0, len(missing), args.batch_size), desc=f"translate {lang}", unit="batch",
                              disable=None, dynamic_ncols=True):
                batch = missing[start:start + args.batch_size]
                pairs = list(zip(batch, run(batch, decoding)))
                cache.put(model, lang, settings_key, pairs)
                known.update(pairs)
        for path, meta in todo:
            meta["captions"][lang] = [[known[c] for c in item] for item in meta["captions"][ENGLISH]]
            meta.setdefault("translations", {})[lang] = record
            text = json.dumps(meta, ensure_ascii=False)
            atomic_write(path, lambda f: f.write(text.encode("utf-8")))
        print(f"{lang}: {len(missing)} captions translated, {len(texts) - len(missing)} from the cache "
              f"({model}); wrote {len(todo)} split(s)")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("splits", nargs="+", help="safe-layout folders (or base paths) with English captions")
    parser.add_argument("--languages", nargs="+", required=True, help="target language codes, e.g. de fr")
    parser.add_argument("--model", required=True,
                        help="hub id or folder; with {lang} in it, one model per target language")
    parser.add_argument("--lang-code", action="append", default=[], metavar="LANG=CODE",
                        help="many-to-many models: the model's code of a language (default: the language itself)")
    parser.add_argument("--source-code", default=ENGLISH, help="many-to-many models: the model's code of English")
    parser.add_argument("--batch-size", type=int, default=32, help="captions per generate call")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--cache", help="SQLite cache file (default: translation_cache.sqlite beside the first split)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace captions of a language that another model (or a person) produced")
    args = parser.parse_args(argv)
    return run_command(lambda: translate(args))


if __name__ == "__main__":
    sys.exit(main())
