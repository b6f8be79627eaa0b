package main

// Log forwarding: every log line of the Go side goes, tagged with its source,
// through a queue to a close-on-exec pipe that the Rust side reads and turns
// into `tracing` events. Go never blocks on the pipe: when the queue is full,
// lines are dropped and counted.

/*
#include "tsnetbridge.h"
*/
import "C"

import (
	"fmt"
	"log"
	"os"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
	"tailscale.com/types/logger"
)

var (
	logQueue   = make(chan string, 4096)
	logDropped atomic.Int64

	logFDMu    sync.Mutex
	logReadFD  = -1 // handed to Rust once
	logFDTaken bool
)

func init() {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return // no pipe, no forwarding: emit drops everything
	}
	// Non-blocking write end, so the writer goroutine parks in the netpoller
	// instead of holding a thread.
	unix.SetNonblock(p[1], true)
	logReadFD = p[0]
	w := os.NewFile(uintptr(p[1]), "tsnetbridge-log")
	go writeLogs(w)

	log.SetFlags(0)
	log.SetOutput(sourceWriter("go/log"))
}

func writeLogs(w *os.File) {
	for line := range logQueue {
		if n := logDropped.Swap(0); n > 0 {
			fmt.Fprintf(w, "bridge\t%d log lines dropped: the reader lagged\n", n)
		}
		if _, err := w.WriteString(line); err != nil {
			return
		}
	}
}

// emit queues msg (split into lines) under source, or drops it. NUL bytes
// go: tsnet marks structured lines with one ("[v\x00JSON]"), and a log
// with NULs in it reads as binary.
func emit(source, msg string) {
	msg = strings.ReplaceAll(strings.TrimRight(msg, "\n"), "\x00", "")
	for line := range strings.SplitSeq(msg, "\n") {
		select {
		case logQueue <- source + "\t" + line + "\n":
		default:
			logDropped.Add(1)
		}
	}
}

// logfFor returns a tailscale Logf that emits under source.
func logfFor(source string) logger.Logf {
	return func(format string, args ...any) {
		emit(source, fmt.Sprintf(format, args...))
	}
}

// sourceWriter adapts emit to io.Writer for the standard log package.
type sourceWriter string

func (s sourceWriter) Write(p []byte) (int, error) {
	emit(string(s), string(p))
	return len(p), nil
}

//export tsnetbridge_take_log_fd
func tsnetbridge_take_log_fd(outFD *C.int) (rc C.int) {
	defer guard(&rc, nil, 0)
	logFDMu.Lock()
	defer logFDMu.Unlock()
	if logFDTaken || logReadFD < 0 {
		return C.TSNB_EALREADY
	}
	logFDTaken = true
	*outFD = C.int(logReadFD)
	return C.TSNB_OK
}
