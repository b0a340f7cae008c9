"""The node as a program: command line, service start-up, process supervision, scheduler, web dashboard."""
