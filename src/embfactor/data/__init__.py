"""Loaders for the bundled data sets (gensim's test data) and for the user's own text and labels."""

from embfactor.data.corpora import (
    gensim_data_dir,
    lee_background,
    lee_documents,
    lee_similarity,
    newsgroup_posts,
    polarity,
    read_labelled,
    read_texts,
    wiki_articles,
    wiki_split,
)

__all__ = [
    "gensim_data_dir",
    "lee_background",
    "lee_documents",
    "lee_similarity",
    "newsgroup_posts",
    "polarity",
    "read_labelled",
    "read_texts",
    "wiki_articles",
    "wiki_split",
]
