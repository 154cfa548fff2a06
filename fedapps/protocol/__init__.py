"""What every method shares, server and client side: messages (:mod:`.messages`), the round
engine (:mod:`.engine`), the start and end of a run (:mod:`.discovery`, :mod:`.evaluation`),
the client half's helpers (:mod:`.node`), results (:mod:`.results`) and what a method is
(:mod:`.method`). Nothing here knows a particular method."""
