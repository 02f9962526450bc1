"""The dataset registry: every dataset `prepare` knows by name, in one table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HubDataset:
    name: str
    repo: str  # hub id
    subsets: tuple[str, ...]  # the first is the default
    streaming: bool
    has_val: bool
    group_rows: str | None = None  # how rows become documents (sources.hub.ROW_GROUPING)


@dataclass(frozen=True)
class Dataset:
    name: str
    about: str
    hub: HubDataset | None = None  # None: the text ships inside llmctl


_TABLE = (
    Dataset("shakespeare", "Tiny Shakespeare (1.1M characters, public domain), shipped with "
            "llmctl"),
    Dataset("tinystories", "roneneldan/TinyStories (Hugging Face datasets)",
            HubDataset("tinystories", "roneneldan/TinyStories", ("default",),
                       streaming=False, has_val=True)),
    Dataset("wikitext", "Salesforce/wikitext (Hugging Face datasets)",
            HubDataset("wikitext", "Salesforce/wikitext",
                       ("wikitext-103-raw-v1", "wikitext-2-raw-v1", "wikitext-103-v1",
                        "wikitext-2-v1"), streaming=False, has_val=True,
                       group_rows="wikitext_articles")),
    Dataset("fineweb", "HuggingFaceFW/fineweb-edu, streamed (Hugging Face datasets)",
            HubDataset("fineweb", "HuggingFaceFW/fineweb-edu",
                       ("sample-10BT", "sample-100BT", "sample-350BT", "default"),
                       streaming=True, has_val=False)),
)
DATASETS: dict[str, Dataset] = {d.name: d for d in _TABLE}
HUB_DATASETS: dict[str, HubDataset] = {d.name: d.hub for d in _TABLE if d.hub is not None}
