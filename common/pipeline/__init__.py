"""Pipeline stage: preprocessing, resampling, sliding-window inference and the end-to-end run of one CT."""
