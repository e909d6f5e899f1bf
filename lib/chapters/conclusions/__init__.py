"""The conclusions page: the cost ladder of every KV-cache placement the book measured
(:mod:`.ladder`, drawn by :mod:`.figures`) and the numbers its rules quote (:mod:`.summary`)."""
