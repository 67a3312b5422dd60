// Command pause is the tests' pod sandbox binary: like registry.k8s.io/pause
// it does nothing until SIGTERM or SIGINT. Built static (CGO_ENABLED=0) into
// the pause image the tests push to their private registry.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
}
