"""Answer normalisation of the official VQA evaluation, the EvalAI / m4c answer processor, and GQA's.

Rules followed (reference files):
  * `vqa_eval_answer` is `processPunctuation` then `processDigitArticle` of the official VQA evaluation,
    GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py`:
      - punctuation: each mark of `; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !` is deleted when the text has that
        mark next to a space or has a comma between two digits ("1,000"), and is replaced by a space otherwise;
        then every period not followed by a digit is deleted ("3.5" keeps its point);
      - digits and articles: lower case, split on whitespace, the number words none/zero..ten become 0..10,
        the articles a / an / the are dropped, and apostrophe-less contractions are restored ("isnt" -> "isn't")
        from the table below, then the words are joined with single spaces.
  * `evalai_answer` is EvalAI's answer processor as LLaVA uses it, haotian-liu/LLaVA `llava/eval/m4c_evaluator.py`
    `EvalAIAnswerProcessor` (copied there from facebookresearch/mmf): lower case, delete every "," and "?", split
    "'s" off its word ("dog's" -> "dog 's"), turn newlines and tabs into spaces, strip, then the two steps above.
    LLaVA applies it to VQAv2 answers before submission (`scripts/convert_vqav2_for_submission.py`) and to both
    sides of TextVQA's comparison (`TextVQAAccuracyEvaluator`).
  * `gqa_answer` is LLaVA's `scripts/convert_gqa_for_eval.py`: trailing periods stripped, lower case; GQA's
    official `eval.py` then compares exactly.

Both reference scripts call `periodStrip.sub("", text, re.UNICODE)`, which passes re.UNICODE (32) as the `count`
argument: at most 32 periods are removed. That is reproduced here so scores match to the last question.

Public API:
  vqa_eval_answer(text) -> str ; evalai_answer(text) -> str ; gqa_answer(text) -> str
  process_punctuation(text) -> str ; process_digit_article(text) -> str
"""
from __future__ import annotations

import functools
import re

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
# The contraction table of vqaEval.py, as published (a few keys, such as "Im", can never match after lower-casing;
# they are kept so the table stays the reference's).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
# As published: "(?!<=\d)" is a look-ahead (not a look-behind), so the pattern is "a period not followed by a digit".
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP_COUNT = re.UNICODE  # the references pass this flag where `count` goes; see the module docstring


def process_punctuation(text: str) -> str:
    """vqaEval's processPunctuation: marks deleted or turned into spaces, periods not before a digit deleted."""
    out = text
    delete_marks = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in PUNCTUATION:
        if delete_marks or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval's processDigitArticle: lower case, number words to digits, articles dropped, contractions restored."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


# Annotator answers repeat across questions ("yes", "2"): caching makes a full VQAv2 val run (2M answers) take
# seconds instead of half a minute.
@functools.lru_cache(maxsize=1 << 17)
def vqa_eval_answer(text: str) -> str:
    """An answer as the official VQA evaluation compares it: "Two dogs." -> "2 dogs", "isnt" -> "isn't"."""
    return process_digit_article(process_punctuation(text))


@functools.lru_cache(maxsize=1 << 17)
def evalai_answer(text: str) -> str:
    """An answer as EvalAI's processor (LLaVA's m4c_evaluator) leaves it: "The dog's toy?" -> "dog 's toy"."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_eval_answer(text)


def gqa_answer(text: str) -> str:
    """A GQA answer as LLaVA submits it to GQA's eval.py: trailing periods stripped, lower case ("Yes." -> "yes")."""
    return text.rstrip(".").lower()
