"""The "bring your own fine-tunes" example study (see README.md, "Bring your own fine-tunes")."""
