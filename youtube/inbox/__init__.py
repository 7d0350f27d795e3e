"""The comment inbox: the comments still waiting for your answer, a drafted reply for each, and
posting only the replies you approved (`python -m youtube.inbox`, and the app's Inbox tab).

    state.py    DIR/inbox.jsonl: the items, their statuses, the lock every change takes
    pull.py     the threads without a reply of the channel, added to the inbox
    review.py   drafts from the fine-tuned adapter, and the creator's edit, approve, skip, regenerate
    posting.py  posting the approved replies, never twice
    cli.py      the command line: pull, draft, list, login, post

``inbox.jsonl`` is one readable line per comment: its id, author, text, draft and status,
rewritten in one rename on each change. Every approved reply is appended to DIR/pairs.jsonl and
every edited draft to DIR/preferences.jsonl (the edit chosen, the draft rejected), the files
training reads as they are; commenters' handles are anonymised there and only there.
"""
