"""The one exception type for bad user input, shared by models/, pipeline/ and jobs/.

Messages name the file (or config key) and the problem in one line, e.g.
`UserError("clip.mp4: not a video (no video stream)")`. The CLI prints them without a traceback.
"""


class UserError(Exception):
    """A problem with the user's input (file, config, flag): one clear line, non-zero exit."""
