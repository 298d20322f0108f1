from pathlib import Path

import numpy as np

from core.labels import get_label_set
from model_store.retrieval import DemoIndex, embed
from producer_sim.synthetic import synthetic_conversations

MELD = get_label_set("meld")


def _index() -> DemoIndex:
    return DemoIndex.build(synthetic_conversations(12), MELD)


def test_index_holds_texts_with_labels_in_the_label_set_and_unit_vectors() -> None:
    index = _index()
    assert len(index.texts) == len(index.labels) == index.embeddings.shape[0] > 20
    assert set(index.labels) <= set(MELD.labels)
    assert np.allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-4)
    assert len(set(index.texts)) == len(index.texts)


def test_inference_lookup_finds_the_nearest_text_in_the_whole_base() -> None:
    index = _index()
    for text, label in list(zip(index.texts, index.labels))[:5]:
        demo = index.lookup([text])[0]
        assert demo is not None and demo.text == text and demo.label == label


def test_training_pairing_keeps_the_label_and_never_returns_the_query_itself() -> None:
    index = _index()
    queries = index.texts[:8]
    demos = index.search(embed(queries), same_label=index.labels[:8], exclude_text=queries)
    for q, label, demo in zip(queries, index.labels[:8], demos):
        if demo is None:  # the only utterance of its label
            assert index.labels.count(label) == 1
            continue
        assert demo.label == label and demo.text != q


def test_balanced_caps_each_label_and_save_load_round_trips(tmp_path: Path) -> None:
    index = _index()
    small = index.balanced(2)
    for label in set(index.labels):
        assert small.labels.count(label) == min(2, index.labels.count(label))
    small.save(tmp_path / "demos")
    loaded = DemoIndex.load(tmp_path / "demos")
    assert loaded.texts == small.texts and loaded.labels == small.labels
    assert np.allclose(loaded.embeddings, small.embeddings, atol=1e-3)
    assert [d.text for d in loaded.lookup(small.texts[:3])] == small.texts[:3]


def test_empty_index_returns_no_demonstration() -> None:
    index = DemoIndex.build([], MELD)
    assert index.lookup(["anything"]) == [None]
