"""The app's tabs, one module each; app.py puts them on one page and serves it.

    reply.py        Reply: both panes for one comment, streamed; the decoding settings; the flywheel
    blind_test.py   Blind test: which reply sounds like the creator, saved as preference pairs
    batch.py        Batch compare: every pane for many comments, as a table
    inbox.py        Inbox: the comment inbox's drafts, edited, approved and posted (youtube.inbox)

Each builds its components inside the caller's tab and wires its own handlers.
"""
