"""Batch scoring of drug libraries (the `score` job kind).

    shards.py  the score_shards table's compare-and-set operations, publishing, reaping
    canon.py   row checks + RDKit canonicalisation, in a forkserver process pool
    table.py   the output table: per-shard part files, the ordered merge, top-K, CSV streaming
    runner.py  scoring one shard (read -> canonicalise -> tokenise -> forward -> write), the
               shard Celery task, and the parent job's loop

A parent `score` job cuts the library into row blocks (shards), publishes one message per
shard on the job's queue, and then works through pending shards itself while any other
worker on the queue takes others: one worker finishes the job alone, N workers share it.
Shard state lives in SQL, so a lost worker costs only its unfinished shard.
"""
