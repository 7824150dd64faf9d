"""A small deterministic corpus for LM tests: the same text on every install and Python."""

from rareret.lm import data

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "an", "el", "is", "om", "ur",
             "bra", "che", "dri", "fla", "gro", "pse", "qua", "sti", "tho", "wen")


def golden_documents(count: int = 160) -> list[data.Document]:
    """~30 kB of pseudo-words and numbers from a fixed LCG: the same text on every install."""
    x = 20240601

    def draw(n):
        nonlocal x
        x = (1103515245 * x + 12345) % 2**31
        return x % n

    lexicon = ["".join(SYLLABLES[draw(len(SYLLABLES))] for _ in range(1 + draw(3)))
               for _ in range(300)]
    documents = []
    for i in range(count):
        sentences = []
        for _ in range(2 + draw(5)):
            words = [lexicon[min(draw(300), draw(300))] for _ in range(4 + draw(9))]
            if draw(4) == 0:
                words.insert(draw(len(words)), str(draw(1000)))
            sentences.append(" ".join(words).capitalize() + ".")
        documents.append(data.Document(f"doc{i}", " ".join(sentences), "golden"))
    return documents
