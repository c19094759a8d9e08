"""Training-loop pieces shared by every stage that trains: state on disk, EMA, loops."""
