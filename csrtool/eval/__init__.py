"""`csrtool eval`: how good is CSR against the baselines a user would otherwise pick.

One idea per module:
- metrics:  error, cosine, SQNR, KL, top-1 agreement, perplexity (pure tensor math)
- methods:  the Method protocol (what a compressor must provide) and trivial methods
- kivi, pq, quanto, csr: the compressors compared, each with honest bits per channel
- runner:   chunked teacher-forced passes through a cache whose old tokens are compressed
- sliding:  what a sliding-window layer holds, hence compresses
- documents: the token windows / files evaluated, each from an empty cache
- bootstrap: paired block bootstrap intervals and the bar's verdicts
- pooling:  per-document and pooled rows, intervals, the bar
- needle:   passkey retrieval through the compressed cache
- suite:    builds the methods from options and runs everything on the same tokens
- report:   rich table, JSON document, PNG plot
"""
