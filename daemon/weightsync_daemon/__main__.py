from weightsync_daemon.server import main

main()
