package main

/*
#include "tsnetbridge.h"
*/
import "C"

import (
	"sync/atomic"
	"syscall"
	_ "unsafe" // go:linkname
)

// origRlimitNofile is the syscall package's record of the soft
// RLIMIT_NOFILE the process was started with: Go's runtime raises the soft
// limit to the hard one (minus one) in every process it lives in, before
// any Rust code runs, and keeps the original only here, to restore it in
// the children os/exec starts. The Rust side needs it for the same reason
// (its commands are started by another process), and Go offers no API for
// it: pulling it by linkname needs `-ldflags=-checklinkname=0` (build.rs).
//
//go:linkname origRlimitNofile syscall.origRlimitNofile
var origRlimitNofile atomic.Pointer[syscall.Rlimit]

//export tsnetbridge_orig_nofile
func tsnetbridge_orig_nofile(outCur *C.uint64_t, outMax *C.uint64_t) (rc C.int) {
	defer guard(&rc, nil, 0)
	lim := origRlimitNofile.Load()
	if lim == nil {
		// Go did not raise it (it was at the hard limit already, or Go code
		// set it since): the current one is the original.
		var cur syscall.Rlimit
		if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &cur); err != nil {
			return C.TSNB_EIO
		}
		lim = &cur
	}
	*outCur = C.uint64_t(lim.Cur)
	*outMax = C.uint64_t(lim.Max)
	return C.TSNB_OK
}
