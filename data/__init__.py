from data.files import quiet_start

quiet_start()  # `python -m data.<command>`: a Ctrl-C while it starts up is one line (data/files.py)
