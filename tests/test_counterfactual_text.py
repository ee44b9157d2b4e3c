"""Counterfactual text: alignment of x and x', sentence features, composition of subsets, word swaps."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from fair_forge.explainability import Granularity, InvalidInputError
from fair_forge.explainability.text.counterfactual import (
    Difference,
    TextSpan,
    align,
    compose,
    difference_token_positions,
    expand_differences,
)
from fair_forge.explainability.text.prompt import build_model_input
from fair_forge.explainability.text.swap import GENDER_PAIRS, swap

NURSE = "The nurse said she was tired."


def chat(user: str, assistant: str = "Noted.") -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user},
            {"role": "assistant", "content": assistant}]


def test_one_word_replaced():
    alignment = align(NURSE, "The nurse said he was tired.")
    assert alignment.roles is None
    assert alignment.differences == (Difference(None, 15, 18, "she", 15, 17, "he"),)


def test_adjacent_changed_words_are_one_difference_and_separated_ones_are_not():
    assert align("She was a nurse.", "He is a nurse.").differences == (
        Difference(None, 0, 7, "She was", 0, 5, "He is"),)
    assert align("She said she was a nurse.", "He said he was a nurse.").differences == (
        Difference(None, 0, 3, "She", 0, 2, "He"), Difference(None, 9, 12, "she", 8, 10, "he"))


def test_insertion_and_deletion_carry_the_space_on_their_left():
    assert align("The nurse was tired.", "The nurse was very tired.").differences == (
        Difference(None, 13, 13, "", 13, 18, " very"),)
    assert align("The nurse was very tired.", "The nurse was tired.").differences == (
        Difference(None, 13, 18, " very", 13, 13, ""),)
    assert align("She was tired.", "She was tired. He left.", max_changed_fraction=1).differences == (
        Difference(None, 14, 14, "", 14, 23, " He left."),)
    # at the start of a text there is no space on the left: the one on the right goes
    assert align("Honestly, she was tired.", "she was tired.", max_changed_fraction=1).differences == (
        Difference(None, 0, 10, "Honestly, ", 0, 0, ""),)


def test_whitespace_between_equal_words_is_a_difference_of_its_own():
    assert align("a  b c d", "a b c e").differences == (
        Difference(None, 1, 2, " ", 1, 1, ""), Difference(None, 7, 8, "d", 6, 7, "e"))


def test_chat_differences_carry_their_message_index():
    x = chat("Is she a good nurse?", "She is.")
    y = chat("Is he a good nurse?", "He is.")
    alignment = align(x, y)
    assert alignment.roles == ("system", "user", "assistant")
    assert alignment.texts == ("Be brief.", "Is she a good nurse?", "She is.")
    assert alignment.differences == (Difference(1, 3, 6, "she", 3, 5, "he"), Difference(2, 0, 3, "She", 0, 2, "He"))


def test_sentence_features_are_the_sentences_that_hold_a_change():
    x = "The nurse left. She was tired and she slept. Nobody called."
    y = "The nurse left. He was tired and he slept. Nobody called."
    words = align(x, y)
    assert len(words.differences) == 2
    assert expand_differences(words, Granularity.WORD) is words
    assert expand_differences(words, "token") is words
    assert expand_differences(words, "sentence").differences == (
        Difference(None, 16, 44, "She was tired and she slept.", 16, 42, "He was tired and he slept."),)
    two = align("She left. Her son stayed.", "He left. His son stayed.")
    assert expand_differences(two, "sentence").differences == (
        Difference(None, 0, 9, "She left.", 0, 8, "He left."),
        Difference(None, 10, 25, "Her son stayed.", 9, 24, "His son stayed."))


def test_sentence_features_follow_the_sentences_of_both_texts():
    # x' turns one sentence into two: the change spans both of them
    split = align("She was tired and he left.", "She was tired. He left.")
    assert expand_differences(split, "sentence").differences == (
        Difference(None, 0, 26, "She was tired and he left.", 0, 23, "She was tired. He left."),)
    # a word inserted at the start of a sentence of x' takes that sentence, as x' has it
    inserted = align("Ask Anna. Anna knows.", "Ask Anna. Maybe Anna knows.")
    assert inserted.differences == (Difference(None, 9, 9, "", 9, 15, " Maybe"),)
    assert expand_differences(inserted, "sentence").differences == (
        Difference(None, 9, 21, " Anna knows.", 9, 27, " Maybe Anna knows."),)
    # a sentence x' appends touches no sentence of x: it stays what it is
    appended = align("She was tired.", "She was tired. He left.", max_changed_fraction=1)
    assert expand_differences(appended, "sentence").differences == appended.differences
    with pytest.raises(InvalidInputError, match="unknown granularity 'paragraph'"):
        expand_differences(appended, "paragraph")


PAIRS = [
    (NURSE, "The nurse said he was tired."),
    ("The nurse was very tired and she left.", "The nurse was tired and he left."),
    ("a  b c d. Her son. Mrs Smith", "a b c e. His son. Mr Smith"),
    ("She was tired and he left.", "She was tired. He left."),
    (chat("Is she a good nurse? She is kind.", "She is."), chat("Is he a good nurse? He is kind.", "He is.")),
]


@pytest.mark.parametrize("granularity", ["word", "sentence"])
@pytest.mark.parametrize("x, y", PAIRS)
def test_composition_round_trips_and_locates_every_kept_difference(x, y, granularity):
    alignment = expand_differences(align(x, y), granularity)
    n = len(alignment.differences)

    def value(composition):
        return composition.prompt if composition.messages is None else list(composition.messages)

    assert value(compose(alignment, [True] * n)) == x
    assert value(compose(alignment, np.zeros(n, dtype=bool))) == y
    for keep in itertools.product([False, True], repeat=n):  # every subset, the single differences among them
        composition = compose(alignment, keep)
        for kept, difference, span in zip(keep, alignment.differences, composition.spans):
            assert (span is not None) == kept
            if kept:
                text = composition.prompt if span.message_index is None else (
                    composition.messages[span.message_index]["content"])
                assert span.message_index == difference.message_index
                assert text[span.start : span.end] == difference.text


def test_random_edits_round_trip_at_every_granularity():
    """Seeded random word edits (replace, insert, delete, odd spacing): differences are ordered, hold their texts,
    and compose gives x, x', and each single difference at its span."""
    rng = random.Random(0)
    vocab = ["she", "he", "the", "nurse", "was", "tired", ".", "!", ",", "and", "Her", "book", "?", "\n", "a"]
    checked = 0
    for _ in range(300):
        x = "".join(rng.choice(vocab) + rng.choice([" ", " ", "", "  ", "\n"]) for _ in range(rng.randint(1, 12)))
        words = x.split(" ")
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(words))
            if rng.random() < 0.4:
                words[i] = rng.choice(vocab)
            elif rng.random() < 0.5:
                words.insert(i, rng.choice(vocab))
            elif len(words) > 1:
                del words[i]
        y = " ".join(words)
        if x.split() == y.split():
            continue  # identical or whitespace-only: the errors tested below
        for granularity in ("word", "sentence"):
            alignment = expand_differences(align(x, y, max_changed_fraction=1), granularity)
            found = alignment.differences
            assert all(a.end <= b.start and a.counterfactual_end <= b.counterfactual_start
                       for a, b in zip(found, found[1:]))
            assert all(x[d.start : d.end] == d.text and y[d.counterfactual_start : d.counterfactual_end]
                       == d.counterfactual_text for d in found)
            assert compose(alignment, [True] * len(found)).prompt == x
            assert compose(alignment, [False] * len(found)).prompt == y
            for k, difference in enumerate(found):
                composition = compose(alignment, [i == k for i in range(len(found))])
                span = composition.spans[k]
                assert composition.prompt[span.start : span.end] == difference.text
        checked += 1
    assert checked > 250


def test_single_difference_kept_gives_exact_texts():
    alignment = align("The nurse was very tired and she left.", "The nurse was tired and he left.")
    only_first = compose(alignment, [True, False])
    assert only_first.prompt == "The nurse was very tired and he left."
    assert only_first.spans == (TextSpan(None, 13, 18), None)
    only_second = compose(alignment, [False, True])
    assert only_second.prompt == "The nurse was tired and she left."
    assert only_second.spans == (None, TextSpan(None, 24, 27))
    with pytest.raises(InvalidInputError, match=r"one boolean per difference \(2\)"):
        compose(alignment, [True])
    with pytest.raises(InvalidInputError, match="one boolean per difference"):
        compose(alignment, [1, 0])


@pytest.mark.parametrize("tokenizer_name", ["gpt2_tokenizer", "llama_tokenizer"])
def test_difference_tokens_in_a_composed_chat(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    alignment = align(chat("The nurse was very tired and she left."), chat("The nurse was tired and he left."))
    for keep in ([True, True], [True, False], [False, True], [False, False]):
        composition = compose(alignment, keep)
        model_input = build_model_input(tokenizer, messages=composition.messages, target="Yes.")
        found = difference_token_positions(model_input, composition.spans)
        pieces = [[model_input.text[slice(*model_input.offsets[p])] for p in positions] for positions in found]
        assert pieces == [[" ", "ver", "y"] if keep[0] else [], [" s", "he"] if keep[1] else []]
    # a kept insertion (x has nothing there) has no tokens
    insertion = align("The nurse was tired.", "The nurse was very tired.")
    composition = compose(insertion, [True])
    model_input = build_model_input(tokenizer, prompt=composition.prompt, target="Yes.")
    assert composition.spans == (TextSpan(None, 13, 13),)
    assert difference_token_positions(model_input, composition.spans) == ((),)


def test_alignment_errors_say_what_is_wrong():
    with pytest.raises(InvalidInputError, match="x has 3 messages and x' has 2"):
        align(chat("Is she here?"), chat("Is he here?")[:2])
    swapped_roles = [{"role": "user", "content": "Be brief."}, *chat("Is he here?")[1:]]
    with pytest.raises(InvalidInputError, match="message 0 is a 'system' message in x but a 'user' message in x'"):
        align(chat("Is she here?"), swapped_roles)
    with pytest.raises(InvalidInputError, match="same kind of input: two prompts"):
        align(NURSE, chat(NURSE))
    with pytest.raises(InvalidInputError, match="x and x' are identical: there is no difference to explain"):
        align(chat(NURSE), chat(NURSE))
    with pytest.raises(InvalidInputError, match="differ only in whitespace"):
        align("The nurse  left.", "The nurse left.")
    with pytest.raises(InvalidInputError, match="message 1 cannot be aligned: x and x' have no word in common there.*"
                                                "give closer texts"):
        align(chat("Is she here?"), chat("Where did everyone go"))
    with pytest.raises(InvalidInputError, match=r"the prompt cannot be aligned: 6 of their 10 words differ \(60%, "
                                                r"above max_changed_fraction=0.5\)"):
        align("She is a nurse.", "He was the nurse.")
    assert len(align("She is a nurse.", "He was the nurse.", max_changed_fraction=0.6).differences) == 1
    with pytest.raises(InvalidInputError, match=r"max_changed_fraction must be a number in \(0, 1\]"):
        align(NURSE, "The nurse said he was tired.", max_changed_fraction=0)


# ---- swap ------------------------------------------------------------------------------------------------------


def test_swap_keeps_case_and_whole_words():
    assert swap(NURSE, "gender") == "The nurse said he was tired."
    assert swap("she She SHE", "gender") == "he He HE"
    assert swap("She shed the sheet; the theme, Sheila.", "gender") == "He shed the sheet; the theme, Sheila."
    assert swap("Mr. Smith met Ms. Jones; she's his aunt.", "gender") == "Ms. Smith met Mr. Jones; he's her uncle."
    assert swap("The women and their daughters.", "gender") == "The men and their sons."


def test_her_and_his_follow_their_position():
    assert swap("Her book is on her desk.", "gender") == "His book is on his desk."
    assert swap("I saw her. I told her the truth, then thanked her", "gender") == (
        "I saw him. I told him the truth, then thanked him")
    assert swap("The book is his. His car is his to keep.", "gender") == "The book is hers. Her car is hers to keep."
    assert swap("He said it was hers.", "gender") == "She said it was his."
    assert swap("Mrs Smith", "gender") == "Mr Smith"  # one-way: Mr -> Ms
    # the documented limit: a content word after an object pronoun reads as a noun
    assert swap("I saw him yesterday.", "gender") == "I saw her yesterday."
    assert swap("I saw her yesterday.", "gender") == "I saw his yesterday."


TEMPLATES = ["The {w} is here.", "{W} called twice.", "Ask the {w}, then leave.", "WHERE IS THE {U}?",
             "A {w}'s view", "({w})", "{w}\n{W}"]


def test_swapping_twice_gives_the_text_back_for_the_bijective_words():
    sentences = [template.format(w=w.lower(), W=w.capitalize(), U=w.upper())
                 for pair in GENDER_PAIRS for w in pair for template in TEMPLATES]
    sentences += ["She told him the truth and he thanked her.", "His book and her pen are on the table.",
                  "It is hers, not his.", "She said her son saw him at the park.", "The woman gave her keys to him."]
    for sentence in sentences:
        swapped = swap(sentence, "gender")
        assert swapped != sentence
        assert swap(swapped, "gender") == sentence, (sentence, swapped)


def test_swap_in_chat_messages_keeps_their_type_and_roles():
    x = [{"role": "system", "content": "Help him.", "name": "guide"},
         {"role": "user", "content": "Is she a good nurse?"}, {"role": "assistant", "content": "She is."}]
    original = [dict(message) for message in x]
    assert swap(x, "gender") == [{"role": "system", "content": "Help her.", "name": "guide"},
                                 {"role": "user", "content": "Is he a good nurse?"},
                                 {"role": "assistant", "content": "He is."}]
    assert x == original  # not changed in place
    assert swap(x, "gender", roles="user") == [x[0], {"role": "user", "content": "Is he a good nurse?"}, x[2]]
    assert swap(x, "gender", roles={"system", "assistant"})[1] == x[1]
    alignment = align(x, swap(x, "gender", roles=["user"]))
    assert alignment.differences == (Difference(1, 3, 6, "she", 3, 5, "he"),)


def test_swap_with_pairs_both_ways_alone_or_on_top_of_gender():
    religion = [("Christian", "Muslim"), ("church", "mosque")]
    assert swap("A Christian visited the church.", "religion", pairs=religion) == "A Muslim visited the mosque."
    assert swap("The MUSLIM left the mosque.", "religion", pairs=religion) == "The CHRISTIAN left the church."
    assert swap("Alice said she would come.", "gender", pairs=[("Alice", "Bob")]) == "Bob said he would come."
    assert swap("New York is big.", pairs=[("New York", "Paris")]) == "Paris is big."


def test_swap_errors_say_what_is_wrong():
    with pytest.raises(InvalidInputError, match=r"unknown attribute 'race': the built-in tables are \['gender'\]"):
        swap(NURSE, "race")
    with pytest.raises(InvalidInputError, match="no 'gender' word occurs in x, so the counterfactual would equal x"):
        swap("The nurse was tired.", "gender")
    with pytest.raises(InvalidInputError, match=r"no 'gender' word occurs in the \['system'\] messages of x"):
        swap(chat("Is she here?"), "gender", roles="system")
    with pytest.raises(InvalidInputError, match="no word of the pairs occurs in x"):
        swap(NURSE, pairs=[("doctor", "surgeon")])
    with pytest.raises(InvalidInputError, match=r"give an attribute \(\['gender'\]\) or pairs="):
        swap(NURSE)
    with pytest.raises(InvalidInputError, match="each of pairs must be two words"):
        swap(NURSE, pairs=[("she",)])
    with pytest.raises(InvalidInputError, match=r"pairs is a list of pairs: write pairs=\[\('she', 'he'\)\]"):
        swap(NURSE, pairs=("she", "he"))
    with pytest.raises(InvalidInputError, match="pairs must be a non-empty list"):
        swap(NURSE, pairs=[])
    with pytest.raises(InvalidInputError, match="'she' is in two pairs"):
        swap(NURSE, pairs=[("she", "he"), ("she", "they")])
    with pytest.raises(InvalidInputError, match="swaps a word with itself"):
        swap(NURSE, pairs=[("she", "She")])
    with pytest.raises(InvalidInputError, match="roles= selects chat messages, but x is a prompt"):
        swap(NURSE, "gender", roles="user")
    with pytest.raises(InvalidInputError, match="roles must name message roles"):
        swap(chat("Is she here?"), "gender", roles=["customer"])
