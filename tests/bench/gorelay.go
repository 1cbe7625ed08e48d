// Contender (h) of tsmux's benchmark: the workaround users deploy instead of tsmux, a Unix socket
// copied to tailscaled's TCP SOCKS5 port. Built by tests/bench/_run.py into the run's work directory
// with Debian's golang-go (standard library only, no network); never part of tsmux.
//
//	gorelay UNIX-PATH MODE HOST:PORT
package main

import (
	"io"
	"log"
	"net"
	"os"
	"strconv"
)

func main() {
	if len(os.Args) != 4 {
		log.Fatal("usage: gorelay UNIX-PATH MODE HOST:PORT")
	}
	path, upstream := os.Args[1], os.Args[3]
	mode, err := strconv.ParseUint(os.Args[2], 8, 32)
	if err != nil {
		log.Fatal(err)
	}
	os.Remove(path)
	listener, err := net.Listen("unix", path)
	if err != nil {
		log.Fatal(err)
	}
	if err := os.Chmod(path, os.FileMode(mode)); err != nil {
		log.Fatal(err)
	}
	for {
		client, err := listener.Accept()
		if err != nil {
			log.Print(err)
			continue
		}
		go relay(client.(*net.UnixConn), upstream)
	}
}

// relay copies both ways, passing a half-close on, and closes both sides once both directions ended.
func relay(client *net.UnixConn, upstream string) {
	defer client.Close()
	conn, err := net.Dial("tcp", upstream)
	if err != nil {
		return
	}
	server := conn.(*net.TCPConn)
	defer server.Close()
	done := make(chan struct{})
	go func() {
		io.Copy(server, client)
		server.CloseWrite()
		close(done)
	}()
	io.Copy(client, server)
	client.CloseWrite()
	<-done
}
