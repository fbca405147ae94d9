from data.files import quiet_start

quiet_start()  # `python -m trainer.<command>`: a Ctrl-C while it starts up is one line (data/files.py)
