// Command etcd is the etcd server (etcdmain, as etcd's own server/main.go), built from the pinned module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
