"""Apply a plan: copy batches (copy), delete batches after confirming the surviving copies
physically exist (delete, confirm), the catalogue-only actions (records), settling item and
replica states with their events (settle), and checkout of an item into a user directory.

May import the foundation, transfer, storage, catalogue and planning (the plan types).
"""
